"""What the console ships in the package: templates, static files, the web app manifest."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"


class Assets:
    """Templates and static files, each static URL carrying its content's hash."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
            trim_blocks=True, lstrip_blocks=True)
        self.tz = ZoneInfo(timezone)
        self.templates.filters["when"] = self.when
        digest = hashlib.sha256()
        for f in sorted(STATIC.rglob("*")):
            if f.is_file():
                digest.update(f.name.encode() + f.read_bytes())
        self.version = digest.hexdigest()[:12]

    def url(self, name: str) -> str:
        """Return the URL of a static file (its version in the query: cache forever)."""
        return f"/static/{name}?v={self.version}"

    def when(self, v: Any) -> str:
        """Return an ISO time (or epoch ms) as a short local time of the report timezone."""
        if v is None or v == "":
            return "—"
        try:
            if isinstance(v, int | float):
                t = datetime.fromtimestamp(v / 1000, self.tz)
            else:
                t = datetime.fromisoformat(str(v).replace("Z", "+00:00")).astimezone(self.tz)
        except (ValueError, OverflowError, OSError):
            return str(v)
        return t.strftime("%Y-%m-%d %H:%M:%S")

    def service_worker(self) -> str:
        """Return the service worker with this build's cache name."""
        return (STATIC / "sw.js").read_text().replace("{{VERSION}}", self.version)

    def manifest(self) -> str:
        """Return the web app manifest (the console installs as an app on a phone)."""
        icons = [{"src": f"/static/icons/{n}", "sizes": s, "type": "image/png",
                  "purpose": p} for n, s, p in (("icon-192.png", "192x192", "any"),
                                                ("icon-512.png", "512x512", "any"),
                                                ("maskable-512.png", "512x512", "maskable"))]
        return json.dumps({
            "name": "acm console", "short_name": "acm", "id": "/alerts",
            "description": "Anti-call-masking alerts for the fraud team",
            "start_url": "/alerts", "scope": "/", "display": "standalone",
            "background_color": "#f4f6f9", "theme_color": "#0f2a4a", "icons": icons,
        }, indent=1)
