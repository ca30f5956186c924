"""docs/SETTINGS.md is generated from the declarations and must be up to date."""

from __future__ import annotations

import subprocess
import sys

import pytest

from acm_module.cli import flag_commands
from acm_module.core import settings
from tests.support.servers import REPO

pytestmark = pytest.mark.timeout(30)

DOC = REPO / "docs" / "SETTINGS.md"
REGENERATE = "acm settings --markdown > docs/SETTINGS.md"


def test_settings_doc_is_up_to_date() -> None:
    assert DOC.exists(), f"docs/SETTINGS.md is missing; run `{REGENERATE}`"
    assert DOC.read_text() == settings.markdown_table(flag_commands()), (
        f"docs/SETTINGS.md is out of date; run `{REGENERATE}`")


def test_the_cli_prints_the_same_table() -> None:
    r = subprocess.run([sys.executable, "-m", "acm_module.cli", "settings", "--markdown"],
                       cwd=REPO, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout == DOC.read_text()


def test_every_setting_is_documented_with_its_env_and_flag() -> None:
    text = DOC.read_text()
    for s in settings.SETTINGS:
        assert f"| `{s.name}` |" in text
        for env in s.env:
            assert f"`{env}`" in text
        if s.cli:
            assert f"`{s.cli}`" in text
