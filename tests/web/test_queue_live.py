"""The console's live queue follows lifecycle changes made elsewhere: an alert assigned and moved
through MI (as `acm alert ...` does) while a browser has the queue open updates its row without
a reload.

Real servers: redis-server, PostgreSQL, `acm writer` and `acm serve`; headless Chromium
(test_console's fixtures).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.web.test_api import fresh_b
from tests.web.test_api_pg import wait_row
from tests.web.test_console import browser, live_queue, pg_console, zmq_burst

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]
__all__ = ["browser", "pg_console"]  # fixtures, used by name


def mi(web: Any, method: str, **params: Any) -> dict[str, Any]:
    """Call the service's MI over HTTP (JSON-RPC 2.0) and return its result."""
    r = httpx.post(f"http://{web.svc.mi_http}/mi", timeout=10.0,
                   json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    body = r.json()
    assert "result" in body, body
    return body["result"]


def test_a_lifecycle_change_made_through_mi_updates_an_open_queue(
        browser: Any, pg_console: Any) -> None:
    web = pg_console(trim_interval=3600)
    with live_queue(browser, web) as page:
        b = fresh_b()
        alert_id = zmq_burst(web.svc.endpoint, b, n=6)[-1]["alert_id"]
        row = page.locator(f'#queue tr[data-alert="{alert_id}"]')
        row.wait_for(timeout=10_000)
        carrier = row.locator("td").nth(5).inner_text()
        wait_row(web.database_url, alert_id)
        page.evaluate("window.notReloaded = true")

        mi(web, "acm_alert_assign", alert_id=alert_id, assignee="carol")
        status = row.locator("td").nth(4)
        status.locator("text=INVESTIGATING").wait_for(timeout=10_000)
        assert row.locator("td").nth(6).inner_text() == "carol"
        mi(web, "acm_alert_status", alert_id=alert_id, status="CONFIRMED", note="by MI")
        status.locator("text=CONFIRMED").wait_for(timeout=10_000)
        assert page.evaluate("window.notReloaded") is True
        # A partial update: what the lifecycle does not change stays as it was.
        assert row.locator("td").nth(5).inner_text() == carrier
        assert b in row.inner_text()

        # A queue filtered on a status loses the row of an alert that left that status.
        page.goto(web.url + "/alerts?status=CONFIRMED")
        page.wait_for_selector("#live.on", timeout=10_000)
        row.wait_for(timeout=10_000)
        mi(web, "acm_alert_status", alert_id=alert_id, status="RESOLVED")
        row.wait_for(state="detached", timeout=10_000)
        assert re.search(r"/alerts\?status=CONFIRMED$", page.url)
