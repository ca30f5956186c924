"""The console's templates and static files ship in the package (a wheel installs them), so the
console works from an install, not only from a checkout."""

from __future__ import annotations

import fnmatch
import json
import tomllib

from tests.support.servers import REPO

CONSOLE = REPO / "acm_module" / "console"


def test_every_console_asset_is_package_data() -> None:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = conf["tool"]["setuptools"]["package-data"]["acm_module"]
    files = [p.relative_to(REPO / "acm_module").as_posix()
             for d in ("templates", "static") for p in (CONSOLE / d).rglob("*") if p.is_file()]
    assert any(f.endswith(".html") for f in files) and any(f.endswith(".png") for f in files)
    missing = [f for f in files if not any(fnmatch.fnmatchcase(f, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_the_icons_are_the_pngs_the_manifest_names() -> None:
    from acm_module.console.assets import STATIC, Assets

    manifest = json.loads(Assets().manifest())
    for icon in manifest["icons"]:
        data = (STATIC / icon["src"].removeprefix("/static/")).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert f"{w}x{h}" == icon["sizes"], icon
