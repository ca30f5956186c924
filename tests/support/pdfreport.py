"""Read the daily report's PDF back (pypdf) and check it against the JSON report."""

from __future__ import annotations

import io
import re
from typing import Any

from pypdf import PdfReader

from acm_module.compliance.report import carrier_cells, headline_rows
from acm_module.compliance.stats import SEVERITIES, DailyStats


def pdf_text(data: bytes) -> str:
    """Return the text of a PDF (its lines' runs of spaces folded to one), checking it is one."""
    assert data.startswith(b"%PDF-"), data[:20]
    reader = PdfReader(io.BytesIO(data))
    assert 1 <= len(reader.pages) <= 2, len(reader.pages)
    return "\n".join(re.sub(r"[ \t]+", " ", p.extract_text()) for p in reader.pages)


def assert_same_figures(data: bytes, report: dict[str, Any]) -> str:
    """Assert the PDF carries the JSON report's date, headline figures, severities and carrier
    rows; return its text."""
    text = pdf_text(data)
    st = DailyStats(**report)
    assert f"daily report - {st.date}" in text
    lines = set(text.splitlines())
    for label, value in headline_rows(st):
        assert f"{label} {value}" in lines, (label, value, text)
    for sev in SEVERITIES:
        assert any(ln.startswith(f"{sev} {st.alerts_by_severity[sev]} ") for ln in lines), sev
    for c in st.carriers:
        cells = carrier_cells(c)
        if all(ch.isascii() for ch in cells[0]):
            assert " ".join(cells) in text, (cells, text)
    return text
