"""A bar-chart PNG with no plotting library.

Our dependencies (torch, transformers, datasets, ...) bring no image writer, and one histogram
does not justify matplotlib (tens of MB): this draws bars, axes, a marker line and numeric tick
labels in a 3x5 pixel font, and encodes the PNG with zlib.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

_DIGITS = {  # 3x5 glyphs, rows top to bottom, "1" = ink
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001001001",
    "8": "111101111101111",
    "9": "111101111001111",
    "k": "100101110101101",
    ".": "000000000000010",
}
WHITE, BLACK, BAR, MARK, GRID = (
    (255, 255, 255),
    (0, 0, 0),
    (70, 110, 180),
    (200, 40, 40),
    (225, 225, 225),
)


def _short(n: float) -> str:
    return f"{n / 1000:.1f}".rstrip("0").rstrip(".") + "k" if n >= 10000 else str(int(n))


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = [bytearray(bytes(WHITE) * w) for _ in range(h)]

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(self.h, y1)):
            row = self.px[y]
            for x in range(max(0, x0), min(self.w, x1)):
                row[3 * x : 3 * x + 3] = bytes(rgb)

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s:
            glyph = _DIGITS.get(ch)
            if glyph:
                for i, bit in enumerate(glyph):
                    if bit == "1":
                        gx, gy = x + (i % 3) * scale, y + (i // 3) * scale
                        self.rect(gx, gy, gx + scale, gy + scale, BLACK)
            x += 4 * scale

    def save(self, path: Path) -> None:
        raw = b"".join(b"\x00" + bytes(row) for row in self.px)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
            )

        Path(path).write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def histogram_png(
    path: Path,
    edges: list[float],
    counts: list[int],
    marker: float | None = None,
    width: int = 640,
    height: int = 360,
) -> None:
    """Bars for counts[i] over [edges[i], edges[i+1]); a red vertical line at `marker`.

    The x axis is labelled at its ends and at the marker, the y axis with the largest count.
    """
    left, right, top, bottom = 50, 15, 15, 35
    c = _Canvas(width, height)
    pw, ph = width - left - right, height - top - bottom
    lo, hi = edges[0], edges[-1]
    peak = max(counts) or 1

    def x_of(v: float) -> int:
        return left + round((v - lo) / ((hi - lo) or 1) * pw)

    for frac in (0.25, 0.5, 0.75, 1.0):
        y = top + ph - round(frac * ph)
        c.rect(left, y, left + pw, y + 1, GRID)
    for i, n in enumerate(counts):
        x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
        c.rect(x0 + 1, top + ph - round(n / peak * ph), max(x0 + 2, x1 - 1), top + ph, BAR)
    c.rect(left, top, left + 1, top + ph + 1, BLACK)
    c.rect(left, top + ph, left + pw + 1, top + ph + 1, BLACK)
    c.text(4, top, _short(peak))
    c.text(4, top + ph - 10, "0")
    c.text(left, top + ph + 8, _short(lo))
    c.text(left + pw - 8 * len(_short(hi)), top + ph + 8, _short(hi))
    if marker is not None and lo <= marker <= hi:
        x = x_of(marker)
        c.rect(x, top, x + 2, top + ph, MARK)
        if marker < hi:  # at the right end the axis label already says it
            c.text(min(x + 4, width - 8 * len(_short(marker))), top + ph + 22, _short(marker))
    c.save(path)
