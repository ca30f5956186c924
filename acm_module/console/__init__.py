"""The fraud team's web console at `/` of the REST API's port: server-rendered pages (Jinja2),
a live alert queue (Server-Sent Events), charts drawn as inline SVG, CSV exports, and an
installable web app (manifest, service worker, icons) — every asset ships in this package.

A room above web/: it uses the API's queries, models and security, and `mount` adds it to the
API's app; cli.py hands `mount` to web/'s app builder, which never imports this room.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles


def mount(app: FastAPI, settings: Any) -> None:
    """Add the console's routes, static files, manifest and service worker to the API app."""
    from acm_module.console.assets import STATIC, Assets
    from acm_module.console.live import Feed
    from acm_module.console.views import build_router
    from acm_module.control.repository import AlertQuery

    assets = Assets(settings.report_timezone)

    def recent() -> list[dict[str, Any]]:
        """Return the repository's newest alerts (as GET /api/v1/alerts reads them)."""
        control = app.state.services.control
        with control._lock:  # the control plane serialises its repository's use
            return list(control.repo.alert_list(AlertQuery(limit=50, scan=2000)))

    feed = Feed(settings.store, settings.partitions, recent=recent)
    app.state.console_feed = feed

    @app.get("/manifest.webmanifest", include_in_schema=False)
    async def manifest() -> Response:
        return Response(assets.manifest(), media_type="application/manifest+json",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/sw.js", include_in_schema=False)
    async def service_worker() -> Response:
        return Response(assets.service_worker(), media_type="text/javascript",
                        headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.include_router(build_router(assets, feed, settings))
