"""The console's pages: server-rendered (Jinja2) views that are clients of the REST API.

Every read and change is a request to the API itself, made in-process (httpx over ASGI, no
socket) with the browser's session cookie: the same authentication, role checks, validation,
MI commands and audit trail as any API client — the console adds no second implementation of
anything and only renders. A POST from a page carries the session's CSRF token as a form field
(a form cannot send the API's X-CSRF-Token header); the console checks it, then calls the API
with the header.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
from collections.abc import Callable, Coroutine, Iterable
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlencode
from zoneinfo import ZoneInfo

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.routing import APIRoute

from acm_module.console import charts, live
from acm_module.console.assets import Assets
from acm_module.core import numbers
from acm_module.core import registry as gw_registry
from acm_module.core import settings as settings_mod
from acm_module.core.alerts import TRANSITIONS, AlertStatus
from acm_module.core.types import SEVERITIES
from acm_module.web.api import API, CSRF_HEADER, SESSION_COOKIE, csrf_of
from acm_module.web.security import same_secret

LOGIN_CSRF_COOKIE = "acm_login_csrf"
FLASH_COOKIE = "acm_flash"
# (path, label, page key, the role that sees it)
MENU = (("/alerts", "Alerts", "alerts", "viewer"), ("/lookup", "Lookup", "lookup", "viewer"),
        ("/whitelist", "Whitelist", "whitelist", "viewer"),
        ("/blocks", "Blocks", "blocks", "viewer"), ("/carriers", "Carriers", "carriers", "viewer"),
        ("/reports", "Daily figures", "reports", "viewer"),
        ("/settings", "Thresholds", "settings", "viewer"), ("/audit", "Audit", "audit", "viewer"),
        ("/users", "Users", "users", "admin"), ("/account", "Account", "account", "viewer"))
ROLES = ("viewer", "analyst", "admin")
MOVE_LABEL = {"INVESTIGATING": "Start investigating", "CONFIRMED": "Confirm fraud",
              "FALSE_POSITIVE": "False positive", "RESOLVED": "Resolve"}
MOVE_CLASS = {"INVESTIGATING": "warn", "CONFIRMED": "danger", "FALSE_POSITIVE": "good",
              "RESOLVED": "secondary"}
# Settings the thresholds page shows, in this order (runtime settings of settings.py).
THRESHOLDS = ("threshold", "window", "mode", "block_ttl", "fanout_threshold", "fanout_window",
              "cli_origin_rule", "dedup_ttl")
CHOICES = {"mode": ("block", "monitor"), "cli_origin_rule": gw_registry.CLI_RULES}
_PAGE = 50
_CSV_MAX = 10_000


class Redirect(Exception):
    """Answer with a redirect (to the login page when the session is gone)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class ApiFailed(Exception):
    """The API refused a request: its status and message, shown to the user."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class User:
    """Who the session belongs to, as the API says (GET /auth/me)."""

    def __init__(self, name: str, role: str) -> None:
        self.name, self.role = name, role

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class Api:
    """The REST API called in-process as the browser's session."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.token = request.cookies.get(SESSION_COOKIE, "")

    def _client(self) -> httpx.AsyncClient:
        peer = self.request.client
        transport = httpx.ASGITransport(
            app=self.request.app, client=(peer.host, peer.port) if peer else ("127.0.0.1", 0))
        return httpx.AsyncClient(transport=transport, base_url="http://console.internal",
                                 timeout=30.0)

    async def raw(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                  json_body: Any = None) -> httpx.Response:
        """Send one request; return the response whatever its status."""
        headers = {"cookie": f"{SESSION_COOKIE}={self.token}"} if self.token else {}
        if method not in ("GET", "HEAD") and self.token:
            headers[CSRF_HEADER] = csrf_of(self.token)
        clean = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        async with self._client() as c:
            return await c.request(method, API + path, params=clean, json=json_body,
                                   headers=headers)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """Send one request; return its JSON. Raises Redirect (401), ApiFailed (other errors)."""
        r = await self.raw(method, path, **kw)
        if r.status_code == 401:
            raise Redirect(_login_url(self.request))
        if r.status_code >= 400:
            try:
                body = r.json()
                code, message = str(body.get("code", "")), str(body.get("message", r.text))
            except ValueError:
                code, message = "error", r.text[:300]
            raise ApiFailed(r.status_code, code, message)
        return r.json() if r.content else None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, params=params)

    async def me(self) -> User:
        """Return the session's user. Raises Redirect when there is none."""
        if not self.token:
            raise Redirect(_login_url(self.request))
        me = await self.get("/auth/me")
        return User(me["user"], me["role"])


# -- helpers ------------------------------------------------------------------------------------
def _login_url(request: Request) -> str:
    nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/login?" + urlencode({"next": nxt})


async def _form(request: Request, api: Api) -> dict[str, str]:
    """Return a POST's form after checking the session's CSRF token in it."""
    form = await request.form()
    if not api.token or not same_secret(str(form.get("csrf", "")), csrf_of(api.token)):
        raise ApiFailed(403, "csrf", "the form's CSRF token is missing or wrong: reload the page")
    return {k: str(v) for k, v in form.items() if isinstance(v, str)}


def _flash(resp: Response, kind: str, text: str) -> Response:
    resp.set_cookie(FLASH_COOKIE, quote(json.dumps([kind, text[:300]])), max_age=30,
                    httponly=True, samesite="strict", path="/")
    return resp


def _back(url: str, kind: str, text: str) -> Response:
    return _flash(RedirectResponse(url, status_code=303), kind, text)


def _safe_next(url: str | None, default: str = "/alerts") -> str:
    """Return a same-site path to go to after a form (never another origin)."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return default
    return url


def _distinct(a: dict[str, Any]) -> int:
    return int(a.get("distinct_max") or a.get("distinct_count") or len(a.get("a_numbers") or []))


def _csv(name: str, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> Response:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else _cell(v) for v in row])
    return PlainTextResponse(buf.getvalue(), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})


def _cell(v: Any) -> Any:
    # A cell a spreadsheet would run as a formula (=, +, -, @) gets a leading quote; phone
    # numbers start with "+", so only when the rest is not a plain number.
    if isinstance(v, list | tuple):
        v = " ".join(str(x) for x in v)
    s = str(v)
    if s[:1] in ("=", "+", "-", "@", "\t", "\r") and not s[1:].replace(".", "").isdigit():
        return "'" + s
    return s


# -- the router ---------------------------------------------------------------------------------
def build_router(assets: Assets, feed: live.Feed, settings: Any) -> APIRouter:
    """Return the console's routes (not in the OpenAPI document)."""
    tmpl = assets.templates
    tz = ZoneInfo(settings.report_timezone)

    def page(request: Request, name: str, user: User | None, status: int = 200,
             **ctx: Any) -> HTMLResponse:
        flashes = []
        raw = request.cookies.get(FLASH_COOKIE)
        if raw:
            try:
                kind, text = json.loads(unquote(raw))
                flashes.append((str(kind), str(text)))
            except (ValueError, TypeError):
                pass
        token = request.cookies.get(SESSION_COOKIE, "")
        ctx.setdefault("csrf", csrf_of(token) if token else "")
        ctx.setdefault("page", "")
        html = tmpl.get_template(name).render(
            user=user, flashes=flashes, static=assets.url,
            menu=[m[:3] for m in MENU if user is not None and user.may(m[3])],
            tz=settings.report_timezone, **ctx)
        resp = HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})
        if raw:
            resp.delete_cookie(FLASH_COOKIE, path="/")
        return resp

    async def error_page(request: Request, status: int, message: str) -> Response:
        user = None
        try:
            user = await Api(request).me()
        except (Redirect, ApiFailed):
            pass
        return page(request, "error.html", user, status=status,
                    title="Not found" if status == 404 else "Error", message=message)

    class ConsoleRoute(APIRoute):
        """A console route: a lost session redirects to the login page, an API error is
        shown as a page (the API's own errors stay JSON)."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                try:
                    return await handler(request)
                except Redirect as e:
                    return RedirectResponse(e.url, status_code=303)
                except ApiFailed as e:
                    return await error_page(request, e.status, e.message)

            return run

    r = APIRouter(include_in_schema=False, route_class=ConsoleRoute)

    # -- login ---------------------------------------------------------------------------
    @r.get("/")
    async def root(request: Request) -> Response:
        api = Api(request)
        try:
            await api.me()
        except Redirect:
            return RedirectResponse("/login", status_code=303)
        return RedirectResponse("/alerts", status_code=303)

    def login_page(request: Request, nxt: str, token: str, error: str | None = None,
                   username: str = "") -> Response:
        resp = page(request, "login.html", None, status=401 if error else 200, title="Log in",
                    page="login", error=error, next=nxt, username=username, csrf=token)
        # The login form's own CSRF token (double submit): no session exists yet.
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, httponly=True,
                        samesite="strict", path="/login")
        return resp

    @r.get("/login")
    async def login_form(request: Request, next: str = "/alerts") -> Response:
        return login_page(request, _safe_next(next), secrets.token_urlsafe(24))

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        nxt = _safe_next(str(form.get("next", "")))
        username = str(form.get("username", ""))[:64]
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected or not same_secret(str(form.get("csrf", "")), expected):
            return login_page(request, nxt, secrets.token_urlsafe(24),
                              "Your login form expired: try again.", username)
        api_resp = await Api(request).raw("POST", "/auth/login", json_body={
            "username": username, "password": str(form.get("password", ""))[:256],
            "session": True})
        if api_resp.status_code != 200:
            msg = {401: "Wrong user name or password.", 422: "Wrong user name or password.",
                   429: "Too many failed logins from your address: wait a minute."}.get(
                api_resp.status_code, f"Login failed ({api_resp.status_code}).")
            return login_page(request, nxt, expected, msg, username)
        resp = RedirectResponse(nxt, status_code=303)
        for cookie in api_resp.headers.get_list("set-cookie"):  # the API's session cookie
            resp.raw_headers.append((b"set-cookie", cookie.encode("latin-1")))
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        api = Api(request)
        await _form(request, api)
        await api.raw("POST", "/auth/logout")
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- alerts --------------------------------------------------------------------------
    def filters(request: Request) -> dict[str, str]:
        q = request.query_params
        return {k: q.get(k, "").strip()[:64] for k in ("status", "severity", "b_number",
                                                       "carrier", "since")}

    async def alert_list(api: Api, f: dict[str, str], limit: int, offset: int = 0
                         ) -> list[dict[str, Any]]:
        since = None
        if f.get("since"):
            try:
                since = datetime.combine(date.fromisoformat(f["since"]), datetime.min.time(),
                                         tz).isoformat()
            except ValueError as e:
                raise ApiFailed(422, "bad_request", "since: expected a date YYYY-MM-DD") from e
        data = await api.get("/alerts", severity=f.get("severity"), status=f.get("status"),
                             b_number=f.get("b_number"), carrier=f.get("carrier"),
                             since=since, limit=limit, offset=offset)
        for a in data["alerts"]:
            a["distinct_max"] = _distinct(a)
        return data["alerts"]

    @r.get("/alerts")
    async def alerts(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        f = filters(request)
        try:
            offset = max(0, min(int(request.query_params.get("offset", "0")), 9000))
        except ValueError:
            offset = 0
        rows = await alert_list(api, f, _PAGE + 1, offset)
        more = None
        if len(rows) > _PAGE:
            rows = rows[:_PAGE]
            more = "/alerts?" + urlencode({**{k: v for k, v in f.items() if v},
                                           "offset": offset + _PAGE})
        query = urlencode({k: v for k, v in f.items() if v})
        return page(request, "alerts.html", user, title="Alerts", page="alerts", alerts=rows,
                    q=f, statuses=_statuses(), severities=SEVERITIES, more_href=more,
                    csv_href="/alerts.csv" + (f"?{query}" if query else ""))

    @r.get("/alerts.csv")
    async def alerts_csv(request: Request) -> Response:
        api = Api(request)
        rows = await alert_list(api, filters(request), 500)
        return _csv("acm-alerts.csv", (
            "alert_id", "detected_at", "last_detection_at", "b_number", "severity",
            "distinct_a_numbers", "status", "assigned_to", "carrier_id", "ncc_incident_id",
            "a_numbers"), ((a["alert_id"], a.get("detected_at"), a.get("last_detection_at"),
                            a["b_number"], a["severity"], a["distinct_max"], a.get("status"),
                            a.get("assigned_to"), a.get("carrier_id"),
                            a.get("ncc_incident_id"), a.get("a_numbers")) for a in rows))

    @r.get("/console/stream")
    async def stream(request: Request) -> Response:
        api = Api(request)
        await api.me()

        async def authorized() -> bool:
            try:
                await api.me()
            except (Redirect, ApiFailed):
                return False
            return True

        f = filters(request)
        if f["b_number"]:
            f["b_number"] = numbers.normalise(f["b_number"], settings.default_country_code) \
                or f["b_number"]
        # Subscribed before the response starts: the browser's "open" means nothing is missed.
        q = await feed.subscribe()
        return StreamingResponse(live.sse(feed, q, f, request.is_disconnected, authorized),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def detail(api: Api, alert_id: str) -> dict[str, Any]:
        try:
            d = await api.get(f"/alerts/{quote(alert_id, safe='')}")
        except ApiFailed as e:
            if e.status == 422:  # not an alert id at all
                raise ApiFailed(404, "not_found", f"no alert {alert_id[:64]!r}") from e
            raise
        d["alert"]["distinct_max"] = _distinct(d["alert"])
        return d

    @r.get("/alerts/{alert_id}")
    async def alert(request: Request, alert_id: str) -> Response:
        api = Api(request)
        user = await api.me()
        d = await detail(api, alert_id)
        a, calls = d["alert"], d["calls"]
        wl = await whitelisted(api, a["b_number"]) if a.get("b_number") else None
        timeline = charts.timeline_svg(
            [charts.Call(c["ts_ms"], c["a_number"], c["verdict"], c["reason"])
             for c in calls if c.get("ts_ms") is not None],
            window_ms=int(a.get("detection_window_ms") or 0),
            first_detection_ms=_ms(a.get("detected_at")))
        status = a.get("status") or "NEW"
        try:
            moves = sorted((x.value for x in TRANSITIONS[AlertStatus(status)]),
                           key=lambda x: list(MOVE_LABEL).index(x) if x in MOVE_LABEL else 9)
        except ValueError:
            moves = []
        actions = [{"at": x.get("at"), "action": x.get("action"),
                    "outcome": x.get("outcome", "ok"), "detail": _change(x)}
                   for x in d["actions"]]
        return page(request, "alert.html", user, title=f"Alert {a['b_number']}",
                    page="alerts", a={**a, "status": status, "notes": "\n".join(d["notes"])},
                    calls=calls, calls_source=d.get("calls_source", "stream"),
                    calls_warning=d.get("calls_warning"),
                    dropped=sum(1 for c in calls if c["verdict"] == "drop"),
                    a_rows=_a_rows(a, calls), timeline=timeline, actions=actions,
                    whitelisted=wl, moves=moves if settings.database_url else [],
                    lifecycle=bool(settings.database_url), can_work=user.may("analyst"),
                    move_label=MOVE_LABEL, move_class=MOVE_CLASS)

    @r.get("/alerts/{alert_id}/a-numbers.csv")
    async def alert_a_csv(request: Request, alert_id: str) -> Response:
        d = await detail(Api(request), alert_id)
        return _csv(f"acm-alert-{d['alert']['alert_id']}-a-numbers.csv",
                    ("a_number", "calls", "first_call", "last_call"),
                    ((x["a"], x["calls"], x["first"], x["last"])
                     for x in _a_rows(d["alert"], d["calls"])))

    @r.post("/alerts/{alert_id}/status")
    async def alert_status(request: Request, alert_id: str) -> Response:
        api = Api(request)
        form = await _form(request, api)
        back = f"/alerts/{quote(alert_id, safe='')}"
        target = form.get("status", "")
        body: dict[str, Any] = {"status": target, "note": form.get("note") or None,
                                "whitelist": form.get("whitelist") == "1"}
        if target == AlertStatus.INVESTIGATING:  # who starts investigating takes the alert
            body["assignee"] = (await api.me()).name
        try:
            out = await api.call("POST", f"/alerts/{quote(alert_id, safe='')}/transitions",
                                 json_body=body)
        except ApiFailed as e:
            return _back(back, "error", e.message)
        if isinstance(out, dict) and out.get("alert_id"):
            out["distinct"] = _distinct(out)
            out.setdefault("last_detection_at", out.get("last_detected_at"))
            feed.publish(out)
        text = f"Alert moved to {target.upper().replace('_', ' ')}."
        if isinstance(out, dict) and out.get("whitelisted"):
            text += f" {out['whitelisted']['b_number']} is whitelisted."
        return _back(back, "ok", text)

    # -- lookup --------------------------------------------------------------------------
    async def whitelisted(api: Api, number: str) -> dict[str, Any] | None:
        data = await api.get("/whitelist", b_number=number, limit=1)
        return (data.get("entries") or [None])[0]

    @r.get("/lookup")
    async def lookup(request: Request, number: str = "") -> Response:
        api = Api(request)
        user = await api.me()
        ctx: dict[str, Any] = {"number": number.strip()[:64], "error": None}
        if ctx["number"]:
            e164 = numbers.normalise(ctx["number"], settings.default_country_code)
            if e164 is None:
                ctx["error"] = f"{ctx['number']!r} is not a phone number."
            else:
                recent = await alert_list(api, {}, 500)
                blocks = await api.get("/blocks", a_number=e164, limit=1)
                ctx.update(number=e164, whitelisted=await whitelisted(api, e164),
                           b_alerts=await alert_list(api, {"b_number": e164}, 100),
                           a_alerts=[a for a in recent if e164 in (a.get("a_numbers") or [])],
                           block=(blocks.get("blocks") or [None])[0])
        return page(request, "lookup.html", user, title="Lookup", page="lookup", **ctx)

    # -- whitelist and blocks ----------------------------------------------------------------
    @r.get("/whitelist")
    async def whitelist(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        data = await api.get("/whitelist", limit=1000)
        return page(request, "whitelist.html", user, title="Whitelist", page="whitelist",
                    entries=data["entries"], can_write=user.may("analyst"))

    @r.get("/whitelist.csv")
    async def whitelist_csv(request: Request) -> Response:
        data = await Api(request).get("/whitelist", limit=_CSV_MAX)
        return _csv("acm-whitelist.csv", ("b_number", "reason", "created_by", "created_at",
                                          "expires_at"),
                    ((e["b_number"], e["reason"], e["created_by"], e["created_at"],
                      e["expires_at"]) for e in data["entries"]))

    @r.post("/whitelist")
    async def whitelist_add(request: Request) -> Response:
        api = Api(request)
        form = await _form(request, api)
        back = _safe_next(form.get("next"), "/whitelist")
        days = form.get("ttl_days", "").strip()
        if days and not days.isdigit():
            return _back(back, "error", "Expires after: a whole number of days.")
        try:
            out = await api.call("POST", "/whitelist", json_body={
                "b_number": form.get("number", "").strip(),
                "reason": form.get("reason", "").strip(),
                "ttl": int(days) * 86400 if days else None})
        except ApiFailed as e:
            return _back(back, "error", e.message)
        return _back(back, "ok", f"{out['b_number']} is whitelisted.")

    async def delete_number(request: Request, kind: str, done: str) -> Response:
        """Delete the form's number from /whitelist or /blocks; go back there."""
        api = Api(request)
        form = await _form(request, api)
        number = form.get("number", "")
        try:
            await api.call("DELETE", f"/{kind}/{quote(number, safe='')}")
        except ApiFailed as e:
            return _back(f"/{kind}", "error", e.message)
        return _back(f"/{kind}", "ok", f"{number} {done}.")

    @r.post("/whitelist/remove")
    async def whitelist_remove(request: Request) -> Response:
        return await delete_number(request, "whitelist", "is no longer whitelisted")

    @r.get("/blocks")
    async def blocks(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        data = await api.get("/blocks", limit=1000)
        cfg = await api.get("/config")
        return page(request, "blocks.html", user, title="Blocks", page="blocks",
                    blocks=data["blocks"], can_write=user.may("analyst"),
                    block_ttl=_current(cfg).get("block_ttl"))

    @r.get("/blocks.csv")
    async def blocks_csv(request: Request) -> Response:
        data = await Api(request).get("/blocks", limit=_CSV_MAX)
        return _csv("acm-blocks.csv", ("a_number", "alert_id", "severity", "expires_at"),
                    ((b["a_number"], b["alert_id"], b["severity"], b["expires_at"])
                     for b in data["blocks"]))

    @r.post("/blocks/remove")
    async def unblock(request: Request) -> Response:
        return await delete_number(request, "blocks", "is released")

    # -- carriers ------------------------------------------------------------------------
    async def registry(api: Api) -> dict[str, Any]:
        return {"carriers": (await api.get("/carriers"))["carriers"],
                "gateways": (await api.get("/gateways"))["gateways"],
                "routes": (await api.get("/routes"))["routes"]}

    @r.get("/carriers")
    async def carriers(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        return page(request, "carriers.html", user, title="Carriers", page="carriers",
                    is_admin=user.may("admin"), licences=gw_registry.LICENCES,
                    cli_rules=gw_registry.CLI_RULES, **await registry(api))

    @r.get("/{kind}.csv")
    async def list_csv(request: Request, kind: str) -> Response:
        api = Api(request)
        if kind == "audit":
            data = await api.get("/audit", limit=_CSV_MAX)
            return _csv("acm-audit.csv", ("at", "actor", "via", "action", "target", "old",
                                          "new"),
                        ((x.get("at"), x.get("actor"), x.get("via"), x.get("action"),
                          x.get("target"), json.dumps(x.get("old")), json.dumps(x.get("new")))
                         for x in data["records"]))
        cols = {"carriers": ("id", "name", "licence", "contact", "cli_rule", "gateways",
                             "routes"),
                "gateways": ("id", "carrier_id", "addresses", "trunks", "rate_limit_cps",
                             "rate_window_s"),
                "routes": ("id", "carrier_id", "direction", "gateway_id", "trunk",
                           "cli_rule")}.get(kind)
        if cols is None:
            raise ApiFailed(404, "not_found", f"no list {kind!r}")
        reg = await registry(api)
        return _csv(f"acm-{kind}.csv", cols, ([e.get(c) for c in cols] for e in reg[kind]))

    @r.post("/carriers")
    async def carrier_add(request: Request) -> Response:
        api = Api(request)
        form = await _form(request, api)
        try:
            await api.call("POST", "/carriers", json_body={
                "id": form.get("id", ""), "name": form.get("name", ""),
                "licence": form.get("licence", ""), "cli_rule": form.get("cli_rule") or None})
        except ApiFailed as e:
            return _back("/carriers", "error", e.message)
        return _back("/carriers", "ok", f"Carrier {form.get('id')} saved.")

    # -- thresholds ----------------------------------------------------------------------
    @r.get("/settings")
    async def thresholds(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        cfg = await api.get("/config")
        values = _current(cfg)
        by_name = {x.name: x for x in settings_mod.SETTINGS}
        rows = [{"name": n, "value": values.get(n, by_name[n].default),
                 "description": by_name[n].description, "choices": CHOICES.get(n)}
                for n in THRESHOLDS if n in by_name]
        return page(request, "settings.html", user, title="Thresholds", page="settings",
                    rows=rows, generation=cfg.get("generation"), is_admin=user.may("admin"))

    @r.post("/settings")
    async def thresholds_set(request: Request) -> Response:
        api = Api(request)
        form = await _form(request, api)
        current = _current(await api.get("/config"))
        changes = {n: form[n].strip() for n in THRESHOLDS
                   if n in form and form[n].strip() != str(current.get(n))}
        if not changes:
            return _back("/settings", "ok", "Nothing changed.")
        try:
            await api.call("PATCH", "/config", json_body=changes)
        except ApiFailed as e:
            return _back("/settings", "error", e.message)
        return _back("/settings", "ok", "Applied: " + ", ".join(
            f"{k} = {v}" for k, v in changes.items()))

    # -- daily figures -------------------------------------------------------------------
    @r.get("/reports")
    async def reports(request: Request, day: str = "") -> Response:
        from acm_module.compliance import report

        api = Api(request)
        user = await api.me()
        day = day or datetime.now(tz).date().isoformat()
        ctx: dict[str, Any] = {"day": day[:10], "error": None}
        try:
            s = await api.get(f"/reports/daily/{quote(day[:10])}")
        except ApiFailed as e:
            ctx["error"] = e.message
        else:
            ttr = (s.get("time_to_resolve_s") or {}).get("median")
            ctx.update(s=s, per_hour=report.chart_svg(s["alerts_per_hour"]),
                       by_severity=charts.bars_svg(list(s["alerts_by_severity"].items())),
                       by_status=charts.bars_svg(list(s["alerts_by_status"].items()),
                                                 css_prefix="st-bar-"),
                       ttr="—" if ttr is None else str(timedelta(seconds=round(ttr))))
        return page(request, "reports.html", user, title="Daily figures", page="reports",
                    **ctx)

    @r.get("/reports/{day}/{name}")
    async def report_file(request: Request, day: str, name: str) -> Response:
        fmt = {"alerts.csv": "csv", "summary.csv": "summary_csv",
               "carriers.csv": "carriers_csv", "report.html": "html",
               "report.pdf": "pdf"}.get(name)
        if fmt is None:
            raise ApiFailed(404, "not_found", f"no report file {name!r}")
        api = Api(request)
        await api.me()
        r_ = await api.raw("GET", f"/reports/daily/{quote(day[:10])}", params={"format": fmt})
        if r_.status_code >= 400:
            raise ApiFailed(r_.status_code, "error", r_.text[:300])
        headers = {"Cache-Control": "no-store"}
        if fmt != "html":
            headers["Content-Disposition"] = f'attachment; filename="acm-{day[:10]}-{name}"'
        return Response(r_.content, media_type=r_.headers.get("content-type"), headers=headers)

    # -- audit ---------------------------------------------------------------------------
    @r.get("/audit")
    async def audit(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        data = await api.get("/audit", limit=200)
        rows = [{"at": x.get("at"), "actor": x.get("actor"), "action": x.get("action"),
                 "target": x.get("target"), "change": _change(x)} for x in data["records"]]
        return page(request, "audit.html", user, title="Audit", page="audit", rows=rows)

    # -- users and tokens ----------------------------------------------------------------
    @r.get("/users")
    async def users(request: Request) -> Response:
        api = Api(request)
        user = await api.me()
        data = await api.get("/users")
        return page(request, "users.html", user, title="Users", page="users",
                    users=data["users"], roles=ROLES)

    @r.post("/users")
    async def user_add(request: Request) -> Response:
        api = Api(request)
        form = await _form(request, api)
        name = form.get("name", "").strip()
        try:
            await api.call("POST", "/users", json_body={
                "name": name, "role": form.get("role", ""), "password": form.get("password", "")})
        except ApiFailed as e:
            return _back("/users", "error", e.message)
        return _back("/users", "ok", f"User {name} created.")

    @r.post("/users/{name}")
    async def user_update(request: Request, name: str) -> Response:
        api = Api(request)
        form = await _form(request, api)
        path = f"/users/{quote(name, safe='')}"
        try:
            if form.get("action") == "delete":
                await api.call("DELETE", path)
                return _back("/users", "ok", f"User {name} deleted.")
            body: dict[str, Any] = {"role": form.get("role") or None,
                                    "disabled": form.get("disabled") == "1"}
            if form.get("password"):
                body["password"] = form["password"]
            await api.call("PATCH", path, json_body=body)
        except ApiFailed as e:
            return _back("/users", "error", e.message)
        return _back("/users", "ok", f"User {name} updated.")

    async def account_page(request: Request, api: Api, new_token: str | None = None
                           ) -> Response:
        user = await api.me()
        data = await api.get(f"/users/{quote(user.name, safe='')}/tokens")
        return page(request, "account.html", user, title="Account", page="account",
                    tokens=data["tokens"], new_token=new_token)

    @r.get("/account")
    async def account(request: Request) -> Response:
        return await account_page(request, Api(request))

    @r.post("/account/tokens")
    async def token_add(request: Request) -> Response:
        api = Api(request)
        form = await _form(request, api)
        user = await api.me()
        try:
            out = await api.call("POST", f"/users/{quote(user.name, safe='')}/tokens",
                                 json_body={"name": form.get("name", "").strip()[:128]})
        except ApiFailed as e:
            return _back("/account", "error", e.message)
        # Shown once, in this response's body (never in a URL, never stored by the console).
        return await account_page(request, api, new_token=out["token"])

    @r.post("/account/tokens/{token_id}/revoke")
    async def token_revoke(request: Request, token_id: str) -> Response:
        api = Api(request)
        await _form(request, api)
        user = await api.me()
        try:
            await api.call("DELETE", f"/users/{quote(user.name, safe='')}/tokens/"
                           f"{quote(token_id, safe='')}")
        except ApiFailed as e:
            return _back("/account", "error", e.message)
        return _back("/account", "ok", f"Token {token_id} revoked.")

    return r


def _statuses() -> list[str]:
    return [x.value for x in AlertStatus]


def _current(cfg: dict[str, Any]) -> dict[str, Any]:
    """Return the settings in force: the startup values overlaid with the live config."""
    return {**(cfg.get("settings") or {}), **(cfg.get("live") or {})}


def _ms(iso: Any) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _a_rows(a: dict[str, Any], calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per A-number of the alert: its calls and first/last call."""
    rows: dict[str, dict[str, Any]] = {n: {"a": n, "calls": 0, "first": None, "last": None}
                                       for n in a.get("a_numbers") or []}
    for c in calls:
        r = rows.setdefault(c["a_number"], {"a": c["a_number"], "calls": 0, "first": None,
                                            "last": None})
        r["calls"] += 1
        r["first"] = r["first"] or c["at"]
        r["last"] = c["at"]
    return sorted(rows.values(), key=lambda r: (r["first"] is None, r["first"] or "", r["a"]))


def _change(x: dict[str, Any]) -> str:
    new = x.get("new")
    if isinstance(new, dict):
        return ", ".join(f"{k}={v}" for k, v in new.items() if v not in (None, ""))[:300]
    return "" if new is None else str(new)[:300]


__all__ = ["build_router"]
