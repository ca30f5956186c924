"""The fraud team's console in a real headless Chromium (Debian's `chromium`, driven by
Playwright; no browser is downloaded): log in, see a burst sent through the ZeroMQ path appear
in the queue without reloading, work the alert through its lifecycle, whitelist the B-number
and see the next burst allowed; the phone-sized layout and the installable app; and, over
plain HTTP, what protects the pages (login, CSRF, headers, CSV exports).

Real servers: redis-server, PostgreSQL, `acm writer` and `acm serve` (tests/support/servers.py).
Under CI=true a missing chromium or Playwright is a failure, not a skip.

Set ACM_CONSOLE_SHOTS=<dir> to save the screenshots docs/CONSOLE.md shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from acm_module.decide.client import Client
from tests.support.pdfreport import assert_same_figures
from tests.support.servers import unavailable
from tests.support.web import PASSWORD, Web, running_web
from tests.web.test_api import fresh_b
from tests.web.test_api_pg import wait_row

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 860}
SHOTS = os.environ.get("ACM_CONSOLE_SHOTS", "")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never `playwright install`)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        unavailable("chromium is not installed (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        try:
            yield b
        finally:
            b.close()


def zmq_burst(endpoint: str, b: str, n: int = 5, tag: str = "") -> list[dict[str, Any]]:
    """Send n calls from distinct A-numbers to b through the ZeroMQ path, 0.3 s apart in call
    time (ending now), as OpenSIPS would; return the replies."""
    tag = tag or f"c{time.monotonic_ns()}"
    start = time.time() - 0.3 * n
    c = Client(endpoint, timeout=10.0)
    try:
        return [c.decide(f"{tag}-{i}", f"+2348031{hash(tag) % 1000:03d}{i:03d}", b,
                         ts=start + 0.3 * i) for i in range(n)]
    finally:
        c.close()


def log_in(page: Any, base: str, user: str) -> None:
    page.goto(base + "/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(re.compile(r".*/alerts$"))


@contextlib.contextmanager
def live_queue(browser: Any, web: Web, user: str = "analyst") -> Iterator[Any]:
    """Log a user in (a fresh desktop context, closed afterwards) and wait for the live queue."""
    ctx = browser.new_context(viewport=DESKTOP)
    try:
        page = ctx.new_page()
        log_in(page, web.url, user)
        page.wait_for_selector("#live.on", timeout=10_000)
        yield page
    finally:
        ctx.close()


def no_horizontal_overflow(page: Any) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    view = page.evaluate("document.documentElement.clientWidth")
    assert width <= view, f"{page.url}: the page is {width}px wide on a {view}px screen"


def shot(page: Any, name: str, full: bool = False) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=full, scale="css")


@pytest.fixture
def pg_console(store_url: str, database_url: str, writer_factory: Any) -> Iterator[Any]:
    """Start `acm serve` (users of every role) and `acm writer` on PostgreSQL; both stopped."""
    with contextlib.ExitStack() as stack:

        def start(trim_interval: float) -> Web:
            writer_factory(env={"DATABASE_URL": database_url},
                           args=["--sinks", "pg", "--trim-interval", str(trim_interval)])
            w = stack.enter_context(running_web(store_url, env={"DATABASE_URL": database_url}))
            w.make_users()
            w.database_url = database_url  # type: ignore[attr-defined]
            return w

        yield start


# -- the analyst's day -----------------------------------------------------------------------------
def test_a_burst_appears_live_is_worked_false_positive_and_whitelisted(
        browser: Any, pg_console: Any) -> None:
    # The episode's calls stay in the stream for the whole test (the timeline reads them).
    web = pg_console(trim_interval=3600)
    with live_queue(browser, web) as page:
        page.evaluate("window.notReloaded = true")

        b = fresh_b()
        replies = zmq_burst(web.svc.endpoint, b, n=6)
        assert replies[-1]["verdict"] == "drop" and replies[-1]["reason"] == "masking"
        alert_id = replies[-1]["alert_id"]
        row = page.locator(f'#queue tr[data-alert="{alert_id}"]')
        row.wait_for(timeout=10_000)  # pushed by the server: no reload
        assert page.evaluate("window.notReloaded") is True
        assert b in row.inner_text() and "HIGH" in row.inner_text()
        shot(page, "console-queue.png")

        wait_row(web.database_url, alert_id)  # type: ignore[attr-defined]
        row.locator("a").click()
        page.wait_for_url(f"**/alerts/{alert_id}")
        assert page.locator("svg.timeline circle").count() == 6
        assert page.locator("svg.timeline circle.dot-drop").count() == 2
        shot(page, "console-alert.png", full=True)

        page.click("button[value=INVESTIGATING]")
        page.wait_for_selector(".flash.ok:has-text('INVESTIGATING')")
        assert "INVESTIGATING" in page.inner_text("#alert-status")
        assert "analyst" in page.inner_text("dl.facts")  # the assignee: who took it

        note = "Hunt group of a bank's call centre: legitimate."
        page.fill("textarea[name=note]", note)
        page.click("button[value=FALSE_POSITIVE]")
        page.wait_for_selector(".flash.ok:has-text('FALSE POSITIVE')")
        assert "FALSE POSITIVE" in page.inner_text("#alert-status")
        assert note in page.inner_text("pre.notes")

        page.click(f"button:has-text('Whitelist {b}')")
        page.wait_for_selector(f".flash.ok:has-text('{b} is whitelisted')")
        page.goto(web.url + "/whitelist")
        assert b in page.inner_text("#whitelist")

        with psycopg.connect(web.database_url) as c:  # type: ignore[attr-defined]
            status, who, notes = c.execute("SELECT status, assigned_to, notes FROM fraud_alerts "
                                           "WHERE alert_id = %s", (alert_id,)).fetchone()
            moves = c.execute("SELECT actor, new->>'status' FROM audit_log WHERE target = %s "
                              "AND action IN ('acm_alert_assign', 'acm_alert_status') "
                              "AND outcome = 'ok' ORDER BY id", (alert_id,)).fetchall()
        assert (status, who) == ("FALSE_POSITIVE", "analyst")
        assert notes.endswith(f"analyst: {note}")
        assert moves == [("analyst", "INVESTIGATING"), ("analyst", "FALSE_POSITIVE")]

        after = zmq_burst(web.svc.endpoint, b, n=6)
        assert {(r["verdict"], r["reason"]) for r in after} == {("allow", "whitelisted")}

        page.goto(web.url + "/reports")  # the day's figures, drawn as charts
        kpis = page.inner_text(".kpis")
        assert re.search(r"\b1\s+alerts", kpis, re.I), kpis
        assert page.locator(".chart svg").count() == 3
        assert page.locator(".chart svg[aria-label*='FALSE_POSITIVE: 1']").count() == 1
        shot(page, "console-reports.png", full=True)


@pytest.fixture
def trimmed_web(pg_console: Any) -> Web:
    """The pool on PostgreSQL with a writer that trims the streams every 0.1 s (so an alert
    record is usually gone from the store before the console's next look)."""
    return pg_console(trim_interval=0.1)


def test_the_queue_shows_alerts_the_writer_already_trimmed_from_the_store(
        browser: Any, trimmed_web: Web) -> None:
    ctx = browser.new_context(viewport=DESKTOP)
    try:
        page = ctx.new_page()
        log_in(page, trimmed_web.url, "viewer")
        page.wait_for_selector("#live.on", timeout=10_000)
        for _ in range(4):
            b = fresh_b()
            zmq_burst(trimmed_web.svc.endpoint, b, n=5)
            page.locator(f"#queue tr:has-text('{b}')").wait_for(timeout=10_000)
    finally:
        ctx.close()


# -- on a phone -----------------------------------------------------------------------------------
def test_on_a_phone_the_console_fits_and_installs_as_an_app(browser: Any, web: Web) -> None:
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True,
                              has_touch=True)
    try:
        page = ctx.new_page()
        log_in(page, web.url, "viewer")
        page.wait_for_selector("#live.on", timeout=10_000)
        b = fresh_b()
        alert_id = zmq_burst(web.svc.endpoint, b, n=7)[-1]["alert_id"]
        page.locator(f'#queue tr[data-alert="{alert_id}"]').wait_for(timeout=10_000)
        no_horizontal_overflow(page)
        shot(page, "console-phone-queue.png")
        page.click(f'#queue tr[data-alert="{alert_id}"] a')
        page.wait_for_url(f"**/alerts/{alert_id}")
        assert "read alerts only" in page.inner_text("main")  # a viewer works nothing
        no_horizontal_overflow(page)
        shot(page, "console-phone-alert.png")
        for path in ("/lookup?number=" + b, "/whitelist", "/blocks", "/carriers",
                     "/reports", "/settings", "/audit"):
            page.goto(web.url + path)
            no_horizontal_overflow(page)

        # Installable: a manifest with the icons a phone needs, served from the package, and a
        # service worker that controls the app and shows the offline page without a network.
        manifest = page.evaluate("fetch('/manifest.webmanifest').then(r => r.json())")
        assert manifest["display"] == "standalone" and manifest["start_url"] == "/alerts"
        sizes = {i["sizes"] for i in manifest["icons"]}
        assert {"192x192", "512x512"} <= sizes
        for icon in manifest["icons"]:
            w, h = page.evaluate(
                "src => fetch(src).then(r => r.blob()).then(createImageBitmap)"
                ".then(i => [i.width, i.height])", icon["src"])
            assert f"{w}x{h}" == icon["sizes"]
        scope = page.evaluate("navigator.serviceWorker.ready.then(r => r.scope)")
        assert scope == web.url + "/"
        page.reload()  # now controlled by the service worker
        assert page.evaluate("!!navigator.serviceWorker.controller")
        cdp = ctx.new_cdp_session(page)
        errors = [e["errorId"] for e in
                  cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]]
        # Chromium's own verdict; a test context is an incognito profile, which never installs.
        assert set(errors) <= {"in-incognito"}, errors
        ctx.set_offline(True)
        page.goto(web.url + "/alerts")
        assert "You are offline" in page.inner_text("h1")
        ctx.set_offline(False)
    finally:
        ctx.close()


# -- what protects the pages -----------------------------------------------------------------------
def session(web: Web, user: str) -> httpx.Client:
    """Log in through the console's form; return the client holding the session cookie."""
    c = web.client(follow_redirects=False)
    form = c.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"username": user, "password": PASSWORD, "csrf": token,
                               "next": "/alerts"})
    assert r.status_code == 303 and r.headers["location"] == "/alerts", r.text
    assert "acm_session" not in r.headers["location"]  # no secret in a URL
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    return c


def test_pages_need_a_login_and_forms_need_the_csrf_token(web: Web) -> None:
    anon = web.client(follow_redirects=False)
    for path in ("/alerts", "/whitelist", "/alerts.csv", "/console/stream", "/settings"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    r = anon.post("/login", data={"username": "analyst", "password": PASSWORD, "csrf": "x"})
    assert "acm_session" not in r.headers.get("set-cookie", "")  # login CSRF refused
    form = anon.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    r = anon.post("/login", data={"username": "analyst", "password": "not the password",
                                  "csrf": token})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    assert "acm_session" not in r.headers.get("set-cookie", "")

    c = session(web, "analyst")
    page = c.get("/whitelist")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    csp = page.headers["content-security-policy"]
    assert "script-src" not in csp or "'unsafe-inline'" not in csp.split("script-src")[1]
    assert "default-src 'self'" in csp and page.headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text and " on" + "click=" not in page.text  # no inline script
    b = fresh_b()
    r = c.post("/whitelist", data={"number": b, "reason": "forged", "csrf": "wrong"})
    assert r.status_code == 403
    assert b not in c.get("/whitelist.csv").text
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = c.post("/whitelist", data={"number": b, "reason": "=HYPERLINK(\"x\")", "csrf": token})
    assert r.status_code == 303
    exported = c.get("/whitelist.csv")
    assert exported.headers["content-type"].startswith("text/csv")
    line = next(x for x in exported.text.splitlines() if x.startswith(b))
    assert "'=HYPERLINK" in line  # a spreadsheet does not run it

    viewer = session(web, "viewer")
    vtoken = re.search(r'name="csrf" value="([^"]+)"',  # type: ignore[union-attr]
                       viewer.get("/alerts").text).group(1)
    r = viewer.post("/whitelist/remove", data={"number": b, "csrf": vtoken})
    assert r.status_code == 303 and r.headers["location"] == "/whitelist"
    assert "needs the analyst role" in unquote(r.headers["set-cookie"])  # the API's refusal
    assert b in c.get("/whitelist.csv").text  # the API refused the viewer: still whitelisted


def test_every_list_exports_csv(web: Web) -> None:
    c = session(web, "admin")
    b = fresh_b()
    zmq_burst(web.svc.endpoint, b, n=5)
    heads = {"/alerts.csv": "alert_id,detected_at", "/whitelist.csv": "b_number,reason",
             "/blocks.csv": "a_number,alert_id", "/carriers.csv": "id,name,licence",
             "/gateways.csv": "id,carrier_id", "/routes.csv": "id,carrier_id",
             "/audit.csv": "at,actor"}
    for path, head in heads.items():
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), path
        assert r.text.startswith(head), (path, r.text[:80])
        assert "attachment" in r.headers["content-disposition"]
    assert b in c.get("/alerts.csv", params={"b_number": b}).text


def test_thresholds_and_carriers_are_for_admins(web: Web) -> None:
    admin, analyst = session(web, "admin"), session(web, "analyst")

    def csrf(c: httpx.Client, path: str) -> str:
        return re.search(r'name="csrf" value="([^"]+)"',  # type: ignore[union-attr]
                         c.get(path).text).group(1)

    assert 'name="threshold"' not in analyst.get("/settings").text  # read-only for others
    r = analyst.post("/settings", data={"threshold": "9", "csrf": csrf(analyst, "/settings")})
    assert "needs the admin role" in unquote(r.headers["set-cookie"])
    live = web.boot.get("/api/v1/config").json()["live"]
    assert live.get("threshold", 5) == 5

    try:
        r = admin.post("/settings", data={"threshold": "6", "window": "5.0",
                                          "csrf": csrf(admin, "/settings")})
        assert r.status_code == 303 and "threshold = 6" in unquote(r.headers["set-cookie"])
        assert web.boot.get("/api/v1/config").json()["live"]["threshold"] == 6
        r = admin.post("/settings", data={"threshold": "zero", "csrf": csrf(admin, "/settings")})
        assert "threshold" in unquote(r.headers["set-cookie"])  # the API's validation message
        assert web.boot.get("/api/v1/config").json()["live"]["threshold"] == 6
    finally:
        web.boot.patch("/api/v1/config", json={"threshold": 5})

    r = admin.post("/carriers", data={"id": "icx1", "name": "Lagos Interconnect Exchange",
                                      "licence": "interconnect_clearinghouse",
                                      "csrf": csrf(admin, "/carriers")})
    assert "Carrier icx1 saved" in unquote(r.headers["set-cookie"])
    assert "icx1,Lagos Interconnect Exchange" in admin.get("/carriers.csv").text
    r = analyst.post("/carriers", data={"id": "x", "name": "x", "licence": "mno",
                                        "csrf": csrf(analyst, "/carriers")})
    assert "needs the admin role" in unquote(r.headers["set-cookie"])


def test_admins_manage_users_and_everyone_their_api_tokens(web: Web) -> None:
    admin = session(web, "admin")
    form = admin.get("/users")
    assert form.status_code == 200 and 'href="/users"' in form.text
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    name = f"ana{time.monotonic_ns() % 10**6}"
    r = admin.post("/users", data={"name": name, "role": "analyst", "password": PASSWORD,
                                   "csrf": token})
    assert f"User {name} created" in unquote(r.headers["set-cookie"])

    ana = session(web, name)
    assert 'href="/users"' not in ana.get("/alerts").text  # not in an analyst's menu
    assert ana.get("/users").status_code == 403
    page = ana.get("/account")
    r = ana.post("/account/tokens", data={"name": "export job", "csrf": re.search(
        r'name="csrf" value="([^"]+)"', page.text).group(1)})  # type: ignore[union-attr]
    api_token = re.search(r'id="new-token">([^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    assert r.headers["cache-control"] == "no-store" and api_token not in str(r.url)
    assert web.client(api_token).get("/api/v1/auth/me").json()["user"] == name

    r = admin.post(f"/users/{name}", data={"role": "analyst", "disabled": "1", "csrf": token})
    assert f"User {name} updated" in unquote(r.headers["set-cookie"])
    time.sleep(2.1)  # the API's authentication cache
    assert web.client(api_token).get("/api/v1/auth/me").status_code == 401
    assert ana.get("/alerts").status_code == 303  # the session is refused too


def test_an_analyst_releases_a_blocked_a_number(web: Web) -> None:
    web.boot.patch("/api/v1/config", json={"block_ttl": 60})
    try:
        time.sleep(1.2)  # every worker applies the live config within a second
        b = fresh_b()
        replies = zmq_burst(web.svc.endpoint, b, n=5)
        assert replies[-1]["reason"] == "masking"
        c = session(web, "analyst")
        page = c.get("/blocks")
        blocked = re.findall(r'name="number" value="([^"]+)"', page.text)
        assert len(blocked) >= 5, page.text[-500:]
        a = blocked[0]
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = c.post("/blocks/remove", data={"number": a, "csrf": token})
        assert f"{a} is released" in unquote(r.headers["set-cookie"])
        assert a not in c.get("/blocks.csv").text
        audit = [x for x in c.get("/audit.csv").text.splitlines() if "acm_unblock" in x]
        assert audit and ",analyst," in audit[0] and a in audit[0]  # the console user acted
    finally:
        web.boot.patch("/api/v1/config", json={"block_ttl": 0})


def test_the_reports_page_links_the_day_as_a_pdf(pg_console: Any) -> None:
    web = pg_console(trim_interval=5)
    alert_id = zmq_burst(web.svc.endpoint, fresh_b(), n=5)[-1]["alert_id"]
    wait_row(web.database_url, alert_id)  # type: ignore[attr-defined]
    day = datetime.now(ZoneInfo("Africa/Lagos")).date().isoformat()  # report_timezone
    c = session(web, "viewer")
    link = f"/reports/{day}/report.pdf"
    assert f'href="{link}"' in c.get("/reports", params={"day": day}).text
    r = c.get(link)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    assert "attachment" in r.headers["content-disposition"]
    report = web.as_role("viewer").get(f"/api/v1/reports/daily/{day}").json()
    assert alert_id in [a["alert_id"] for a in report["alerts"]]
    assert_same_figures(r.content, report)
