"""The REST API under /api/v1 (FastAPI; the OpenAPI 3 document is served at /openapi.json).

Every state change goes through the same code as MI (`Control.invoke`, the commands of
acm_module/control/commands/ and acm_module/actions/mi.py): the same validation, the same
audit trail, with the API user as the actor. Events go to the same worker pool over its ZeroMQ
endpoint (web/decide.py).

Auth: `Authorization: Bearer <token>` (an API token, a login token, or the bootstrap
`api_token`), or the console's session cookie, whose unsafe requests also need the
X-CSRF-Token header. No or a wrong token: 401; a role that may not: 403.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from acm_module.control import jsonrpc
from acm_module.control.audit import Caller, iso_ms
from acm_module.control.audit import record as audit_record
from acm_module.control.jsonrpc import MIError
from acm_module.control.repository import AlertQuery
from acm_module.core import numbers
from acm_module.core.errors import StoreError
from acm_module.web import models as m
from acm_module.web.decide import CurvePoolClient, PoolBusy, PoolClient, PoolTimeout
from acm_module.web.security import (
    BOOTSTRAP_ACTOR,
    ApiError,
    Passwords,
    Principal,
    new_token,
    same_secret,
    token_hash,
)
from acm_module.web.users import TokenRecord, User, UserRepository, now_ms

log = logging.getLogger("acm.web")

API = "/api/v1"
EVENTS_PATH = API + "/fraud/events"
SESSION_COOKIE = "acm_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_AUTH_CACHE_S = 2.0  # a revoked token stops working in this process at once, elsewhere ≤ 2 s
_SCAN_ALL = 10_000
LOGIN_FAILURES = 10
MAX_BODY = 256 * 1024  # the largest legitimate body (a gateway with 256 addresses) is ~10 KiB
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
     b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
]


def _err(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"code": code, "message": message}, status_code=status,
                        headers=headers)


_MI_STATUS = {jsonrpc.INVALID_PARAMS: (422, "bad_params"), jsonrpc.NOT_FOUND: (404, "not_found"),
              jsonrpc.STORE_UNAVAILABLE: (503, "unavailable"),
              jsonrpc.CONFIG_INVALID: (503, "not_configured"),
              jsonrpc.CONFLICT: (409, "conflict")}


class _HttpMiddleware:
    """A pure ASGI middleware (no per-request task) acting on HTTP requests only."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        else:
            await self.http(scope, receive, send)

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Handle one HTTP request (passing it on to self.app)."""
        raise NotImplementedError


class SecurityHeaders(_HttpMiddleware):
    """Add the security headers to every response."""

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += _SECURITY_HEADERS
                if scope["path"].startswith(API):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit(_HttpMiddleware):
    """Answer 413 to a request body larger than MAX_BODY, before any of it is kept: no client
    can take the process's memory (counts chunked bodies as they arrive)."""

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
                await _too_large(send)
                return
        seen, over = 0, False

        async def limited() -> dict[str, Any]:
            nonlocal seen, over
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:  # the app sees a client gone; the client gets the 413
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not over:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not over:
                raise
        if over:
            await _too_large(send)


async def _too_large(send: Any, security: bool = False) -> None:
    body = json.dumps({"code": "too_large",
                       "message": f"request body larger than {MAX_BODY} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                            *(_SECURITY_HEADERS if security else [])]})
    await send({"type": "http.response.body", "body": body})


class LoginGuard:
    """Failed logins per address (a sliding minute), and the few argon2 checks run at once."""

    def __init__(self) -> None:
        self.slot = threading.BoundedSemaphore(2)
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, peer: str, now: float) -> collections.deque[float]:
        q = self._failures.setdefault(peer, collections.deque())
        while q and q[0] < now - 60.0:
            q.popleft()
        return q

    def check(self, peer: str) -> None:
        """Raise ApiError 429 when the address failed too often within the last minute."""
        with self._lock:
            if len(self._recent(peer, time.monotonic())) >= LOGIN_FAILURES:
                raise ApiError(429, "too_many_attempts",
                               "too many failed logins from this address; wait a minute")

    def failed(self, peer: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._recent(peer, time.monotonic()).append(time.monotonic())


class Services:
    """What the handlers use: settings, the control plane, users, the pool client."""

    def __init__(self, settings: Any, control: Any, users: UserRepository,
                 pool: PoolClient | CurvePoolClient | None) -> None:
        self.settings = settings
        self.control = control
        self.users = users
        self.pool = pool
        self.passwords = Passwords()
        self.logins = LoginGuard()
        self._auth_cache: dict[str, tuple[float, Principal | None]] = {}

    # -- auth ------------------------------------------------------------------------------
    def principal(self, token: str) -> Principal | None:
        """Return who a token belongs to, or None (blocking: run it in a thread)."""
        boot = self.settings.api_token
        if boot and same_secret(token, boot):
            return Principal(user=BOOTSTRAP_ACTOR, role="admin")
        h = token_hash(token)
        rec = self.users.token_get(h)
        if rec is None:
            return None
        user = self.users.user_get(rec.user)
        if user is None or user.disabled:
            return None
        return Principal(user=user.name, role=user.role, token_id=rec.id, token_kind=rec.kind)

    def cached_principal(self, token: str) -> tuple[bool, Principal | None]:
        """Return (hit, principal) from the short-lived cache."""
        hit = self._auth_cache.get(token)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def remember(self, token: str, p: Principal | None) -> None:
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        self._auth_cache[token] = (time.monotonic() + _AUTH_CACHE_S, p)

    def forget_all(self) -> None:
        """Drop cached authentications (after a revocation, a role change)."""
        self._auth_cache.clear()

    # -- commands --------------------------------------------------------------------------
    def run(self, p: Principal, request: Request, method: str, **params: Any) -> Any:
        """Run an MI command as the caller; map its errors to ApiError (blocking)."""
        caller = caller_of(p, request)
        try:
            return self.control.invoke(caller, method, {k: v for k, v in params.items()
                                                         if v is not None})
        except MIError as e:
            status, code = _MI_STATUS.get(e.code, (500, "internal"))
            raise ApiError(status, code, e.message) from e

    def audit(self, p: Principal, request: Request, action: str, target: str, old: Any,
              new: Any) -> None:
        """Write one audit record for a change the API made itself (users, tokens)."""
        with self.control._lock:  # the control plane serialises its repository's use
            audit_record(self.control.repo, caller_of(p, request), action, target, old, new)


def caller_of(p: Principal, request: Request) -> Caller:
    peer = request.client
    via = f"web:{peer.host}:{peer.port}" if peer else "web"
    return Caller(actor=p.user, via=via, role=p.role)


def csrf_of(token: str) -> str:
    """Return the CSRF token bound to a session token (derived: nothing else to keep)."""
    return hashlib.sha256(b"acm-csrf:" + token.encode()).hexdigest()[:32]


_bearer = HTTPBearer(auto_error=False, description="an API token, a login token or api_token")


async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def principal_for(svc: Services, token: str) -> Principal:
    """Return who holds a token (cached briefly). Raises ApiError 401, 503."""
    hit, p = svc.cached_principal(token)
    if not hit:
        try:
            p = await run_in_threadpool(svc.principal, token)
        except StoreError as e:
            raise ApiError(503, "unavailable", f"user repository unavailable: {e}") from e
        svc.remember(token, p)
    if p is None:
        raise ApiError(401, "unauthorized", "invalid or expired token")
    return p


async def identify(request: Request) -> Principal:
    """Return the caller of a request. Raises ApiError 401 (no/wrong token), 403 (CSRF)."""
    svc: Services = request.app.state.services
    session = False
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        token = request.cookies.get(SESSION_COOKIE, "")
        session = bool(token)
    token = token.strip()
    if not token:
        raise ApiError(401, "unauthorized", "authentication required: Authorization: Bearer "
                       "<token>")
    p = await principal_for(svc, token)
    if session:
        if request.method not in _SAFE_METHODS and not same_secret(
                request.headers.get(CSRF_HEADER, ""), csrf_of(token)):
            raise ApiError(403, "csrf", f"missing or wrong {CSRF_HEADER} header")
        return Principal(user=p.user, role=p.role, token_id=p.token_id,
                         token_kind=p.token_kind, session=True)
    return p


async def authenticate(request: Request,
                       cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                       ) -> Principal:
    """The dependency form of identify() (declares the bearer scheme in the document)."""
    return await identify(request)


def require(role: str) -> Callable[..., Any]:
    """Return a dependency that admits callers with at least `role`."""

    async def dep(p: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not p.may(role):
            raise ApiError(403, "forbidden", f"needs the {role} role (you are {p.role})")
        return p

    return dep


Viewer = Annotated[Principal, Depends(require("viewer"))]
Analyst = Annotated[Principal, Depends(require("analyst"))]
Admin = Annotated[Principal, Depends(require("admin"))]
Svc = Annotated[Services, Depends(services)]
Number = Annotated[str, Path(min_length=1, max_length=m.NUMBER_MAX)]
Id = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Cascade = Annotated[bool, Query()]

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": m.ErrorBody, "description": d} for s, d in (
        (401, "no token, or a wrong one"), (403, "the role may not"),
        (422, "bad input: nothing was changed"), (503, "a dependency is unavailable"))}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": m.ErrorBody,
                                                     "description": "no such thing"}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": m.ErrorBody,
                                                    "description": "changed concurrently"}}


def _ts_ms(v: datetime | None) -> int | None:
    if v is None:
        return None
    if v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return max(0, int(v.timestamp() * 1000))  # nothing happened before 1970


def _validation_message(errors: Sequence[Any]) -> str:
    """Say what is wrong with a request in one line (the first few problems)."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else
                     str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """Return the document generator, adding the schemas of hand-parsed bodies."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description=app.description)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas["CallEventRequest"] = m.CallEventRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


def create_app(svc: Services) -> FastAPI:
    """Build the application around its services."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if svc.pool is not None:
            await svc.pool.start()
        try:
            yield
        finally:
            if svc.pool is not None:
                await svc.pool.close()

    app = FastAPI(title="acm REST API", version="1.0.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="Anti-call-masking detection: call events, alerts and their "
                  "lifecycle, whitelist and blocks, the carrier registry, live configuration, "
                  "audit trail and daily reports. Errors are {code, message}.")
    app.state.services = svc
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _err(e.status, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _err(422, "bad_request", _validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _err(e.status_code, code, str(e.detail))

    @app.exception_handler(StoreError)
    async def _store(request: Request, e: StoreError) -> JSONResponse:
        return _err(503, "unavailable", f"store or database unavailable: {e}")

    app.include_router(_public_router())
    app.include_router(_events_router(), responses=_ERRORS)
    app.include_router(_auth_router(), responses=_ERRORS)
    app.include_router(_alerts_router(), responses=_ERRORS)
    app.include_router(_lists_router(), responses=_ERRORS)
    app.include_router(_registry_router(), responses=_ERRORS)
    app.include_router(_ops_router(), responses=_ERRORS)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


# -- public -----------------------------------------------------------------------------------
def _public_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["public"])

    @r.get("/health", response_model=m.Health)
    async def health() -> dict[str, str]:
        """Say the API process is up (no auth)."""
        return {"status": "ok"}

    @r.post("/auth/login", response_model=m.LoginResponse,
            responses={401: {"model": m.ErrorBody}, 422: {"model": m.ErrorBody},
                       429: {"model": m.ErrorBody, "description": "too many failed logins"},
                       503: {"model": m.ErrorBody}})
    def login(body: m.LoginRequest, request: Request, response: Response,
              svc: Svc) -> dict[str, Any]:
        """Log in with a password; return a bearer token (and, with session=true, set the
        console's session cookie and return its CSRF token). After LOGIN_FAILURES failed
        logins from one address within a minute, that address gets 429 for the rest of it."""
        peer = request.client.host if request.client else "?"
        svc.logins.check(peer)
        user = svc.users.user_get(body.username)
        with svc.logins.slot:  # argon2 is CPU on purpose: a few at a time, never a flood
            ok = user is not None and not user.disabled and svc.passwords.verify(
                user.password_hash, body.password)
            if user is None:  # spend the same time as a wrong password: no user enumeration
                svc.passwords.verify(_DUMMY_HASH.get(svc), body.password)
        if not ok or user is None:
            svc.logins.failed(peer)
            log.warning("failed login for %r from %s", body.username[:64], peer)
            raise ApiError(401, "unauthorized", "wrong user name or password")
        token = new_token()
        ttl_ms = int(svc.settings.web_session_ttl * 1000)
        rec = TokenRecord(hash=token_hash(token), user=user.name, kind="session",
                          name="login", created_ms=now_ms(), expires_ms=now_ms() + ttl_ms)
        svc.users.token_put(rec)
        out: dict[str, Any] = {"token": token, "expires_at": iso_ms(rec.expires_ms),
                               "user": user.name, "role": user.role}
        if body.session:
            secure = request.url.scheme == "https"
            response.set_cookie(SESSION_COOKIE, token, max_age=ttl_ms // 1000, httponly=True,
                                samesite="strict", secure=secure, path="/")
            out["csrf_token"] = csrf_of(token)
        return out

    return r


class _DummyHash:
    """A valid argon2 hash to verify against when the user does not exist."""

    def __init__(self) -> None:
        self._hash: str | None = None

    def get(self, svc: Services) -> str:
        if self._hash is None:
            self._hash = svc.passwords.hash("not a password of anyone")
        return self._hash


_DUMMY_HASH = _DummyHash()


# -- events -----------------------------------------------------------------------------------
_EVENT_BODY = {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/CallEventRequest"}}}}


async def decide_event(svc: Services, p: Principal, raw: bytes) -> bytes:
    """Decide one CallEventRequest body for a caller; return the DetectionResponse as JSON.

    Raises ApiError (403 role, 422 bad body or refused by the pool, 503 pool trouble)."""
    if not p.may("analyst"):
        raise ApiError(403, "forbidden", f"needs the analyst role (you are {p.role})")
    try:
        body = m.CallEventRequest.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(422, "bad_request", _validation_message(e.errors())) from e
    if svc.pool is None:
        raise ApiError(503, "unavailable", "no worker pool endpoint")
    req: dict[str, Any] = {"call_id": body.call_id, "a": body.a_number, "b": body.b_number}
    if body.timestamp is not None:
        ts = body.timestamp if body.timestamp.tzinfo else body.timestamp.replace(tzinfo=UTC)
        req["ts"] = ts.timestamp()
    if body.source_ip:
        req["src_ip"] = body.source_ip
    if body.trunk:
        req["trunk"] = body.trunk
    try:
        rep = await svc.pool.request(req)
    except PoolBusy as e:
        raise ApiError(503, "overloaded", str(e)) from e
    except PoolTimeout as e:
        raise ApiError(503, "unavailable", str(e)) from e
    if "error" in rep:
        code = str(rep["error"])
        status = 503 if code in ("store_unavailable", "internal", "store_error") else 422
        raise ApiError(status, code, str(rep.get("message", code)))
    alert_id = rep.get("alert_id") or None
    return json.dumps({
        "status": "accepted", "call_id": body.call_id, "call_status": body.status,
        "detection_result": {
            "detected": alert_id is not None,
            "threat_level": (rep.get("severity") or "NONE") if alert_id else "NONE",
            "distinct_a_numbers": int(rep.get("distinct", 0)),
            "alert_id": alert_id, "verdict": rep["verdict"], "reason": rep["reason"]}},
        separators=(",", ":")).encode()


class EventsFastPath:
    """Answer `POST /api/v1/fraud/events` with a bearer token before the framework: the same
    decide_event() as the route, the same limits, headers and errors, a fraction of the CPU
    (FastAPI's routing and middleware cost more than the decision; benchmarks/RESULTS.md §7).
    Anything else, and cookie sessions (which need CSRF), go to the application."""

    def __init__(self, app: Any, svc: Services) -> None:
        self.app = app
        self.svc = svc

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] != EVENTS_PATH
                or scope["method"] != "POST"):
            await self.app(scope, receive, send)
            return
        token = ""
        length = -1
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    token = rest.strip()
            elif name == b"content-length":
                length = int(value) if value.isdigit() else MAX_BODY + 1
        if not token:
            await self.app(scope, receive, send)
            return
        if length > MAX_BODY:
            await _too_large(send, security=True)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _too_large(send, security=True)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        extra: list[tuple[bytes, bytes]] = []
        try:
            p = await principal_for(self.svc, token)
            status, out = 200, await decide_event(self.svc, p, b"".join(chunks))
        except ApiError as e:
            status = e.status
            out = json.dumps({"code": e.code, "message": e.message}).encode()
            if status == 401:
                extra.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(out)).encode()), *extra, *_SECURITY_HEADERS,
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": out})


def _events_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["events"])

    # The hot endpoint parses, authorises and answers by hand: FastAPI's dependency and
    # response-model machinery cost more than the decision itself (benchmarks/RESULTS.md §7).
    # The document still describes it: the body schema is declared below and in openapi().
    @r.post("/fraud/events", response_model=m.DetectionResponse,
            openapi_extra={"requestBody": _EVENT_BODY, "security": [{"HTTPBearer": []}]})
    async def submit_event(request: Request) -> Response:
        """Decide one call with the worker pool (the design document's CallEventRequest)."""
        p = await identify(request)
        out = await decide_event(request.app.state.services, p, await request.body())
        return Response(out, media_type="application/json")

    return r


# -- auth, users, tokens ------------------------------------------------------------------------
def _user_out(u: User) -> dict[str, Any]:
    return {"name": u.name, "role": u.role, "created_at": iso_ms(u.created_ms),
            "disabled": u.disabled}


def _token_out(t: TokenRecord) -> dict[str, Any]:
    return {"id": t.id, "user": t.user, "kind": t.kind, "name": t.name,
            "created_at": iso_ms(t.created_ms), "expires_at": iso_ms(t.expires_ms)}


def _self_or_admin(p: Principal, name: str) -> None:
    if p.user != name and not p.may("admin"):
        raise ApiError(403, "forbidden", "only an admin manages another user's tokens")


def _auth_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["auth"])

    @r.get("/auth/me", response_model=m.Me)
    async def me(p: Viewer, request: Request) -> dict[str, Any]:
        """Say who the caller is (and the CSRF token of a cookie session)."""
        out: dict[str, Any] = {"user": p.user, "role": p.role}
        if p.session:
            out["csrf_token"] = csrf_of(request.cookies.get(SESSION_COOKIE, ""))
        return out

    @r.post("/auth/logout", status_code=204)
    def logout(p: Viewer, request: Request, svc: Svc) -> Response:
        """End this login: revoke its login token (an API token stays) and clear the session
        cookie."""
        if p.token_kind == "session":
            svc.users.token_delete(p.user, p.token_id)
            svc.forget_all()
        resp = Response(status_code=204)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @r.get("/users", response_model=m.UserList)
    def list_users(p: Admin, svc: Svc) -> dict[str, Any]:
        """List the users."""
        return {"users": [_user_out(u) for u in svc.users.user_list()]}

    @r.post("/users", response_model=m.UserOut, status_code=201, responses=_CONFLICT)
    def create_user(body: m.UserCreate, p: Admin, request: Request, svc: Svc
                    ) -> dict[str, Any]:
        """Create a user."""
        if svc.users.user_get(body.name) is not None:
            raise ApiError(409, "conflict", f"user {body.name!r} exists")
        u = User(name=body.name, role=body.role, password_hash=svc.passwords.hash(
            body.password), created_ms=now_ms())
        svc.users.user_put(u)
        svc.audit(p, request, "web_user_add", f"user:{u.name}", None, {"role": u.role})
        return _user_out(u)

    @r.patch("/users/{name}", response_model=m.UserOut, responses=_NOT_FOUND)
    def update_user(name: str, body: m.UserUpdate, p: Admin, request: Request, svc: Svc
                    ) -> dict[str, Any]:
        """Change a user's role, password or disabled flag."""
        old = svc.users.user_get(name)
        if old is None:
            raise ApiError(404, "not_found", f"no user {name!r}")
        new = User(name=name, role=body.role or old.role,
                   password_hash=svc.passwords.hash(body.password) if body.password
                   else old.password_hash, created_ms=old.created_ms,
                   disabled=old.disabled if body.disabled is None else body.disabled)
        svc.users.user_put(new)
        svc.forget_all()
        changes = {"role": new.role, "disabled": new.disabled,
                   **({"password": "changed"} if body.password else {})}
        svc.audit(p, request, "web_user_update", f"user:{name}",
                  {"role": old.role, "disabled": old.disabled}, changes)
        return _user_out(new)

    @r.delete("/users/{name}", status_code=204, responses=_NOT_FOUND)
    def delete_user(name: str, p: Admin, request: Request, svc: Svc) -> Response:
        """Delete a user and revoke every token of theirs."""
        old = svc.users.user_delete(name)
        if old is None:
            raise ApiError(404, "not_found", f"no user {name!r}")
        svc.forget_all()
        svc.audit(p, request, "web_user_remove", f"user:{name}", {"role": old.role}, None)
        return Response(status_code=204)

    @r.get("/users/{name}/tokens", response_model=m.TokenList)
    def list_tokens(name: str, p: Viewer, svc: Svc) -> dict[str, Any]:
        """List a user's tokens (yours, or anyone's for an admin)."""
        _self_or_admin(p, name)
        return {"tokens": [_token_out(t) for t in svc.users.token_list(name)]}

    @r.post("/users/{name}/tokens", response_model=m.TokenCreated, status_code=201,
            responses=_NOT_FOUND)
    def create_token(name: str, body: m.TokenCreate, p: Viewer, request: Request, svc: Svc
                     ) -> dict[str, Any]:
        """Create an API token (shown once) for yourself, or for anyone as an admin."""
        _self_or_admin(p, name)
        if svc.users.user_get(name) is None:
            raise ApiError(404, "not_found", f"no user {name!r}")
        token = new_token()
        rec = TokenRecord(hash=token_hash(token), user=name, kind="api", name=body.name,
                          created_ms=now_ms())
        svc.users.token_put(rec)
        svc.audit(p, request, "web_token_add", f"user:{name}", None,
                  {"token_id": rec.id, "name": rec.name})
        return {**_token_out(rec), "token": token}

    @r.delete("/users/{name}/tokens/{token_id}", status_code=204, responses=_NOT_FOUND)
    def revoke_token(name: str, p: Viewer, request: Request, svc: Svc,
                     token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]) -> Response:
        """Revoke a token (yours, or anyone's for an admin)."""
        _self_or_admin(p, name)
        old = svc.users.token_delete(name, token_id)
        if old is None:
            raise ApiError(404, "not_found", f"no token {token_id} of {name!r}")
        svc.forget_all()
        svc.audit(p, request, "web_token_revoke", f"user:{name}",
                  {"token_id": old.id, "name": old.name}, None)
        return Response(status_code=204)

    return r


# -- alerts -------------------------------------------------------------------------------------
def _alerts_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["alerts"])

    @r.get("/alerts", response_model=m.AlertPage)
    def list_alerts(p: Viewer, svc: Svc,
                    severity: Annotated[m.SeverityName | None, Query()] = None,
                    status: Annotated[str | None, Query(max_length=32)] = None,
                    b_number: Annotated[str | None, Query(max_length=m.NUMBER_MAX)] = None,
                    carrier: Annotated[str | None, Query(max_length=64)] = None,
                    since: Annotated[datetime | None, Query()] = None,
                    until: Annotated[datetime | None, Query()] = None,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50,
                    offset: Annotated[int, Query(ge=0, le=9500)] = 0) -> dict[str, Any]:
        """List alerts, newest last detection first, filtered and paged."""
        post = status is not None or carrier is not None or severity is not None
        number = None
        if b_number is not None:

            number = numbers.normalise(b_number, svc.settings.default_country_code)
            if number is None:
                raise ApiError(422, "bad_request", f"b_number: {b_number!r} is not a number")
        q = AlertQuery(b_number=number, min_severity=severity, since_ms=_ts_ms(since),
                       until_ms=_ts_ms(until), limit=_SCAN_ALL if post else offset + limit,
                       scan=5000)
        with svc.control._lock:
            alerts = svc.control.repo.alert_list(q)
        if post:
            alerts = [a for a in alerts
                      if (severity is None or a["severity"] == severity)
                      and (status is None or (a.get("status") or "NEW") == status.upper())
                      and (carrier is None or (a.get("carrier_id") or "") == carrier)]
        page = alerts[offset:offset + limit]
        for a in page:
            a.setdefault("status", "NEW")
        return {"count": len(page), "offset": offset, "limit": limit,
                "source": svc.control.repo.name, "alerts": page}

    @r.get("/alerts/{alert_id}", response_model=m.AlertDetail, responses=_NOT_FOUND)
    def alert_detail(alert_id: UUID, p: Viewer, request: Request, svc: Svc) -> dict[str, Any]:
        """One alert: its A-numbers, calls, timeline and the actions taken on it."""
        from acm_module.web import queries

        return queries.alert_detail(svc, p, request, str(alert_id))

    @r.post("/alerts/{alert_id}/transitions", response_model=m.Result,
            responses={**_NOT_FOUND, **_CONFLICT})
    def transition(alert_id: UUID, body: m.Transition, p: Analyst, request: Request,
                   svc: Svc) -> Any:
        """Move an alert through its lifecycle (with a note, an assignee, and for
        FALSE_POSITIVE optionally whitelisting the B-number)."""
        aid = str(alert_id)
        out: Any = None
        if body.assignee is not None:
            out = svc.run(p, request, "acm_alert_assign", alert_id=aid, assignee=body.assignee)
        status = body.status.strip().upper()
        current = (out or {}).get("status")
        if status != current:
            out = svc.run(p, request, "acm_alert_status", alert_id=aid, status=status,
                          note=body.note, whitelist=body.whitelist, reason=body.reason)
        elif body.note:
            out = svc.run(p, request, "acm_alert_note", alert_id=aid, note=body.note)
        return out

    @r.post("/alerts/{alert_id}/notes", response_model=m.Result, responses=_NOT_FOUND)
    def add_note(alert_id: UUID, body: m.NoteIn, p: Analyst, request: Request,
                 svc: Svc) -> Any:
        """Add a note to an alert."""
        return svc.run(p, request, "acm_alert_note", alert_id=str(alert_id), note=body.note)

    @r.post("/alerts/{alert_id}/assign", response_model=m.Result, responses=_NOT_FOUND)
    def assign(alert_id: UUID, body: m.Assign, p: Analyst, request: Request,
               svc: Svc) -> Any:
        """Assign an alert (a NEW alert becomes INVESTIGATING)."""
        return svc.run(p, request, "acm_alert_assign", alert_id=str(alert_id),
                       assignee=body.assignee, note=body.note)

    return r


# -- whitelist, blocks ----------------------------------------------------------------------------
def _lists_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["lists"])

    @r.get("/whitelist", response_model=m.Result)
    def whitelist(p: Viewer, request: Request, svc: Svc,
                  b_number: Annotated[str | None, Query(max_length=m.NUMBER_MAX)] = None,
                  limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> Any:
        """List whitelisted B-numbers."""
        return svc.run(p, request, "acm_whitelist_list", number=b_number, limit=limit)

    @r.post("/whitelist", response_model=m.Result, status_code=201)
    def whitelist_add(body: m.WhitelistIn, p: Analyst, request: Request, svc: Svc) -> Any:
        """Whitelist a B-number (calls to it are allowed and not counted)."""
        return svc.run(p, request, "acm_whitelist_add", number=body.b_number,
                       reason=body.reason, created_by=p.user,
                       expires_at=None if body.expires_at is None
                       else _ts_ms(body.expires_at) / 1000.0, ttl=body.ttl)

    @r.delete("/whitelist/{b_number}", response_model=m.Result, responses=_NOT_FOUND)
    def whitelist_remove(b_number: Number, p: Analyst, request: Request, svc: Svc) -> Any:
        """Remove a B-number from the whitelist."""
        return svc.run(p, request, "acm_whitelist_remove", number=b_number)

    @r.get("/blocks", response_model=m.Result)
    def blocks(p: Viewer, request: Request, svc: Svc,
               a_number: Annotated[str | None, Query(max_length=m.NUMBER_MAX)] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> Any:
        """List blocked A-numbers."""
        return svc.run(p, request, "acm_block_list", number=a_number, limit=limit)

    @r.delete("/blocks/{a_number}", response_model=m.Result, responses=_NOT_FOUND)
    def unblock(a_number: Number, p: Analyst, request: Request, svc: Svc) -> Any:
        """Release a blocked A-number."""
        return svc.run(p, request, "acm_unblock", number=a_number)

    return r


# -- carriers, gateways, routes -------------------------------------------------------------------
def _registry_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["registry"])

    @r.get("/carriers", response_model=m.Result)
    def carriers(p: Viewer, request: Request, svc: Svc) -> Any:
        """List carriers with the ids of their gateways and routes."""
        return svc.run(p, request, "acm_carrier_list")

    _registry_add(r, "carrier", m.CarrierIn)
    _registry_remove(r, "carrier", "Remove a carrier (cascade: with its gateways and routes).")
    _registry_listing(r, "gateway")
    _registry_add(r, "gateway", m.GatewayIn)

    @r.put("/gateways/{id}/limit", response_model=m.Result, responses=_NOT_FOUND)
    def gateway_limit(id: Id, body: m.GatewayLimit, p: Admin, request: Request,
                      svc: Svc) -> Any:
        """Set a gateway's rate limit."""
        return svc.run(p, request, "acm_gateway_set_limit", id=id, **body.model_dump())

    _registry_remove(r, "gateway", "Remove a gateway (cascade: with its routes).")
    _registry_listing(r, "route")
    _registry_add(r, "route", m.RouteIn)
    _registry_remove(r, "route", "Remove a route.", cascade=False)
    return r


# The registry's entries are MI commands named acm_<kind>_<verb>; each route below serves one
# for every kind, under the name (and so the operationId) a hand-written handler would have.
def _registry_listing(r: APIRouter, kind: str) -> None:
    """Serve GET /<kind>s: the registry's entries of that kind."""

    def listing(p: Viewer, svc: Svc) -> Any:
        with svc.control._lock:
            entries = svc.control.repo.registry_get()[f"{kind}s"]
        return {"count": len(entries), f"{kind}s": entries}

    r.get(f"/{kind}s", response_model=m.Result, name=f"{kind}s",
          description=f"List {kind}s.")(listing)


def _registry_add(r: APIRouter, kind: str, body_model: type[BaseModel]) -> None:
    """Serve POST /<kind>s as the MI command acm_<kind>_add."""

    def add(body: Any, p: Admin, request: Request, svc: Svc) -> Any:
        return svc.run(p, request, f"acm_{kind}_add", **body.model_dump())

    add.__annotations__["body"] = body_model  # what FastAPI validates and documents
    r.post(f"/{kind}s", response_model=m.Result, status_code=201, name=f"{kind}_add",
           description=f"Add or replace a {kind}.")(add)


def _registry_remove(r: APIRouter, kind: str, doc: str, cascade: bool = True) -> None:
    """Serve DELETE /<kind>s/{id} as the MI command acm_<kind>_remove, with the query
    parameter `cascade` when the kind has dependants."""
    command = f"acm_{kind}_remove"

    def remove(id: Id, p: Admin, request: Request, svc: Svc) -> Any:
        return svc.run(p, request, command, id=id)

    def remove_cascade(id: Id, p: Admin, request: Request, svc: Svc,
                       cascade: Cascade = False) -> Any:
        return svc.run(p, request, command, id=id, cascade=cascade)

    r.delete(f"/{kind}s/{{id}}", response_model=m.Result, responses=_NOT_FOUND,
             name=f"{kind}_remove", description=doc)(remove_cascade if cascade else remove)


# -- config, stats, audit, reports ----------------------------------------------------------------
def _ops_router() -> APIRouter:
    r = APIRouter(prefix=API, tags=["operations"])

    @r.get("/config", response_model=m.Result)
    def get_config(p: Viewer, request: Request, svc: Svc) -> Any:
        """The live detection configuration, its generation, sources and overrides."""
        return svc.run(p, request, "acm_get_config")

    @r.patch("/config", response_model=m.Result, responses=_CONFLICT)
    def set_config(body: dict[str, Any], p: Admin, request: Request, svc: Svc) -> Any:
        """Change runtime settings (same validation and audit as MI acm_set)."""
        if not body:
            raise ApiError(422, "bad_params", "give at least one setting: {\"threshold\": 7}")
        return svc.run(p, request, "acm_set", **{str(k): v for k, v in body.items()})

    @r.get("/stats", response_model=m.Result)
    def stats(p: Viewer, request: Request, svc: Svc) -> Any:
        """Decisions by verdict and reason, latency, per worker and per carrier."""
        return svc.run(p, request, "acm_stats")

    @r.get("/audit", response_model=m.Result)
    def audit(p: Viewer, request: Request, svc: Svc,
              action: Annotated[str | None, Query(max_length=64)] = None,
              target: Annotated[str | None, Query(max_length=255)] = None,
              since: Annotated[datetime | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=10000)] = 50) -> Any:
        """The audit trail, newest first."""
        return svc.run(p, request, "acm_audit_list", action=action, target=target,
                       since=None if since is None else _ts_ms(since) / 1000.0, limit=limit)

    @r.get("/reports/daily/{day}", response_model=m.Result,
           responses={200: {"content": {"text/csv": {}, "text/html": {},
                                        "application/pdf": {}}}})
    def daily_report(day: date, p: Viewer, svc: Svc,
                     format: Annotated[str, Query(pattern="^(json|csv|summary_csv|"
                                                  "carriers_csv|html|pdf)$")] = "json") -> Any:
        """The regulator's daily report of a day (report_timezone): JSON, CSV (alerts,
        summary, carriers), the one-page HTML or the PDF document."""
        from acm_module.web import queries

        st = queries.daily_stats(svc, day)
        from acm_module.compliance import report

        if format == "json":
            return st.to_json()
        if format == "html":
            return HTMLResponse(report.to_html(st))
        if format == "pdf":
            return Response(report.to_pdf(st), media_type="application/pdf", headers={
                "Content-Disposition": f'attachment; filename="acm-daily-{day}.pdf"'})
        text = {"csv": report.alerts_csv, "summary_csv": report.summary_csv,
                "carriers_csv": report.carriers_csv}[format](st)
        return PlainTextResponse(text, media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="acm-daily-{day}-{format}.csv"'})

    return r
