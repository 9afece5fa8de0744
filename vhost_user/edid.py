"""An EDID 1.4 base block (128 bytes) describing one display mode.

What a vhost-user-gpu front-end answers GET_EDID with (inside a
virtio_gpu_resp_edid): a digital monitor whose preferred mode, in the
first detailed timing descriptor, is the configured resolution at 60 Hz
(lower when the pixel clock would not fit the descriptor's 16-bit field),
with a monitor name, a range-limits descriptor and a checksum. Blanking
follows CVT reduced blanking (160 pixels, 48 front porch, 32 sync) with a
vertical blank of at least 460 us, so the timing is one a real panel
could run.
"""

from __future__ import annotations

import math
import struct

EDID_SIZE = 128
EDID_HEADER = b"\x00\xff\xff\xff\xff\xff\xff\x00"
MAX_ACTIVE = 4095
"""A detailed timing descriptor holds 12-bit active sizes."""

MANUFACTURER = "XVB"
PRODUCT_CODE = 0x4750  # "GP"
MONITOR_NAME = "xvb gpu"
DPI = 96

_H_BLANK, _H_FRONT, _H_SYNC = 160, 48, 32
_V_FRONT, _V_SYNC = 3, 4
_MIN_V_BLANK_S = 460e-6


def _manufacturer_id(letters: str) -> bytes:
    """Three letters A-Z packed into 5-bit fields, big endian."""
    value = 0
    for ch in letters:
        value = value << 5 | (ord(ch) - ord("A") + 1)
    return struct.pack(">H", value)


def mode_timing(width: int, height: int, refresh: int = 60) -> dict:
    """Blanking, sync and pixel clock (in 10 kHz units) of a mode."""
    if not (1 <= width <= MAX_ACTIVE and 1 <= height <= MAX_ACTIVE):
        raise ValueError(f"an EDID detailed timing holds modes up to {MAX_ACTIVE}x{MAX_ACTIVE}, "
                         f"not {width}x{height}")
    h_total = width + _H_BLANK
    while True:
        line_time = 1.0 / (refresh * height) * (1 - _MIN_V_BLANK_S * refresh)
        v_blank = max(_V_FRONT + _V_SYNC + 6, math.ceil(_MIN_V_BLANK_S / line_time))
        v_total = height + v_blank
        clock = math.ceil(h_total * v_total * refresh / 10_000)
        if clock <= 0xFFFF or refresh <= 1:
            break
        refresh -= 1
    return {"h_blank": _H_BLANK, "h_front": _H_FRONT, "h_sync": _H_SYNC, "v_blank": v_blank,
            "v_front": _V_FRONT, "v_sync": _V_SYNC, "clock": min(clock, 0xFFFF), "refresh": refresh}


def _detailed_timing(width: int, height: int) -> bytes:
    t = mode_timing(width, height)
    w_mm = round(width * 25.4 / DPI)
    h_mm = round(height * 25.4 / DPI)
    return bytes([
        t["clock"] & 0xFF, t["clock"] >> 8,
        width & 0xFF, t["h_blank"] & 0xFF, (width >> 8) << 4 | t["h_blank"] >> 8,
        height & 0xFF, t["v_blank"] & 0xFF, (height >> 8) << 4 | t["v_blank"] >> 8,
        t["h_front"] & 0xFF, t["h_sync"] & 0xFF,
        (t["v_front"] & 0xF) << 4 | (t["v_sync"] & 0xF),
        (t["h_front"] >> 8) << 6 | (t["h_sync"] >> 8) << 4 | (t["v_front"] >> 4) << 2 | t["v_sync"] >> 4,
        w_mm & 0xFF, h_mm & 0xFF, (w_mm >> 8 & 0xF) << 4 | (h_mm >> 8 & 0xF),
        0, 0,
        0x1E,  # digital separate sync, both polarities positive, not interlaced
    ])


def _descriptor(tag: int, data: bytes) -> bytes:
    assert len(data) == 13
    return bytes([0, 0, 0, tag, 0]) + data


def _text(text: str) -> bytes:
    raw = text.encode("ascii")[:13]
    if len(raw) < 13:
        raw += b"\n" + b" " * (12 - len(raw))
    return raw


def _range_limits(width: int, height: int) -> bytes:
    t = mode_timing(width, height)
    h_khz = math.ceil(t["clock"] * 10 / (width + t["h_blank"]))  # 10 kHz * 10 / pixels = kHz
    max_clock_10mhz = math.ceil(t["clock"] / 1000) + 1
    data = bytes([
        max(1, t["refresh"] - 10), min(255, t["refresh"] + 15),
        max(1, h_khz - 10), min(255, h_khz + 10),
        min(255, max_clock_10mhz),
        0x01,  # range limits only, no timing formula
    ]) + b"\n" + b" " * 6
    return _descriptor(0xFD, data)


def build_edid(width: int, height: int, *, serial: int = 1) -> bytes:
    """The 128-byte EDID base block for a ``width`` x ``height`` display."""
    w_cm = max(1, round(width * 2.54 / DPI))
    h_cm = max(1, round(height * 2.54 / DPI))
    block = bytearray(EDID_HEADER)
    block += _manufacturer_id(MANUFACTURER)
    block += struct.pack("<HI", PRODUCT_CODE, serial & 0xFFFFFFFF)
    block += bytes([1, 2026 - 1990])  # week 1 of the model year
    block += bytes([1, 4])  # EDID 1.4
    block += bytes([0x80, min(w_cm, 255), min(h_cm, 255), 120, 0x06])  # digital; 2.2 gamma; sRGB, preferred
    block += bytes([0xEE, 0x91, 0xA3, 0x54, 0x4C, 0x99, 0x26, 0x0F, 0x50, 0x54])  # sRGB chromaticity
    block += bytes(3)  # no established timings
    block += b"\x01\x01" * 8  # no standard timings
    block += _detailed_timing(width, height)
    block += _descriptor(0xFC, _text(MONITOR_NAME))
    block += _range_limits(width, height)
    block += _descriptor(0x10, bytes(13))  # dummy
    block += b"\x00"  # no extension blocks
    block.append(-sum(block) & 0xFF)
    assert len(block) == EDID_SIZE
    return bytes(block)
