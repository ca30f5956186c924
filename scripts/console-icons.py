#!/usr/bin/env python3
"""Draw the console's app icons (PNG) into acm_module/console/static/icons/.

The icon: many callers (A-numbers, left) converging on one called number (B, right) — call
masking at a glance. Pure Python (zlib), so regenerating needs nothing installed; the PNGs are
committed, and the package ships them (no network, no image library at run time).
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "acm_module/console/static/icons"
BG = (15, 42, 74)       # navy
LINE = (120, 160, 210)  # light blue
A_DOT = (255, 255, 255)
B_DOT = (230, 57, 70)   # alert red
SS = 3                  # supersampling per axis


def _png(size: int, rows: list[bytes]) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _seg_dist(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> float:
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
    return math.hypot(px - (ax + t * dx), py - (ay + t * dy))


def draw(size: int, maskable: bool) -> bytes:
    """Return the PNG of one icon; a maskable one keeps its drawing in the 80 % safe zone."""
    inset = 0.2 if maskable else 0.1
    radius = 0.0 if maskable else 0.18  # rounded corners, unless the platform masks it
    bx, by = 0.78, 0.5
    srcs = [(0.2 + 0.06 * abs(k), 0.5 + 0.17 * k) for k in (-2, -1, 0, 1, 2)]

    def scale(v: float) -> float:  # drawing space [0,1] -> icon space with the inset
        return inset + v * (1 - 2 * inset)

    b = (scale(bx), scale(by))
    a_pts = [(scale(x), scale(y)) for x, y in srcs]
    lw, ar, br = 0.02, 0.05, 0.1
    rows = []
    n = size * SS
    for y in range(size):
        row = bytearray()
        for x in range(size):
            acc = [0.0, 0.0, 0.0, 0.0]
            for sy in range(SS):
                for sx in range(SS):
                    u, v = (x * SS + sx + 0.5) / n, (y * SS + sy + 0.5) / n
                    # rounded square background
                    cx, cy = min(max(u, radius), 1 - radius), min(max(v, radius), 1 - radius)
                    if radius and math.hypot(u - cx, v - cy) > radius:
                        continue
                    col = BG
                    if any(_seg_dist(u, v, *p, *b) < lw for p in a_pts):
                        col = LINE
                    if any(math.hypot(u - p[0], v - p[1]) < ar for p in a_pts):
                        col = A_DOT
                    if math.hypot(u - b[0], v - b[1]) < br:
                        col = B_DOT
                    acc[0] += col[0]
                    acc[1] += col[1]
                    acc[2] += col[2]
                    acc[3] += 255
            k = SS * SS
            alpha = acc[3] / k
            if alpha:
                row += bytes((round(acc[0] / (acc[3] / 255)), round(acc[1] / (acc[3] / 255)),
                              round(acc[2] / (acc[3] / 255)), round(alpha)))
            else:
                row += b"\x00\x00\x00\x00"
        rows.append(bytes(row))
    return _png(size, rows)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, size, maskable in (("icon-192.png", 192, False), ("icon-512.png", 512, False),
                                 ("maskable-512.png", 512, True), ("apple-touch-icon.png", 180,
                                                                    True),
                                 ("favicon-32.png", 32, False)):
        (OUT / name).write_bytes(draw(size, maskable))
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
