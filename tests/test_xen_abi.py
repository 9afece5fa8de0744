"""xen/abi.py against the source of truth: Xen's own hvm/ioreq.h, compiled.

A C program fills struct ioreq and struct buf_ioreq (bitfields included)
and prints their bytes; our pack must produce the same bytes and our unpack
must read them back. libxen-dev (installed by scripts/setup) ships the
header."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from xen import abi

HEADER = "/usr/include/xen/hvm/ioreq.h"

C_PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stddef.h>
#include <xen/hvm/ioreq.h>

static void dump(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

int main(void) {
    struct ioreq r;
    memset(&r, 0, sizeof r);
    r.addr = 0x0200000000000070ULL; r.data = 0x1122334455667788ULL; r.count = 1; r.size = 4;
    r.vp_eport = 0xabcd; r.state = STATE_IOREQ_READY; r.data_is_ptr = 1; r.dir = IOREQ_READ; r.df = 1;
    r.type = IOREQ_TYPE_COPY;
    dump(&r, sizeof r);
    printf("%zu %zu %zu %zu %zu %zu\n", sizeof r, offsetof(struct ioreq, addr), offsetof(struct ioreq, data),
           offsetof(struct ioreq, count), offsetof(struct ioreq, size), offsetof(struct ioreq, vp_eport));
    struct buf_ioreq b;
    memset(&b, 0, sizeof b);
    b.type = IOREQ_TYPE_COPY; b.dir = IOREQ_READ; b.size = 2; b.addr = 0xfedcb; b.data = 0xdeadbeef;
    dump(&b, sizeof b);
    printf("%zu %zu\n", sizeof(struct buffered_iopage), offsetof(struct buffered_iopage, buf_ioreq));
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists(HEADER):
        pytest.fail(f"needs a C compiler and {HEADER} (scripts/setup installs gcc and libxen-dev)")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "layout.c", d / "layout"
    src.write_text(C_PROGRAM)
    subprocess.run([cc, "-D__XEN_TOOLS__", "-o", str(exe), str(src)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    return lines


def test_ioreq_pack_matches_the_c_struct(c_layout):
    ours = abi.Ioreq(
        addr=0x0200000000000070,
        data=0x1122334455667788,
        count=1,
        size=4,
        vp_eport=0xABCD,
        state=abi.IoreqState.IOREQ_READY,
        data_is_ptr=True,
        is_read=True,
        df=True,
        type=abi.IoreqType.COPY,
    )
    buf = bytearray(32)
    ours.pack_into(buf)
    assert buf.hex() == c_layout[0]
    assert abi.Ioreq.unpack(bytes.fromhex(c_layout[0])) == ours


def test_ioreq_offsets_match(c_layout):
    size, addr, data, count, sz, eport = map(int, c_layout[1].split())
    assert size == abi.IOREQ_SIZE
    assert (addr, data, count, sz, eport) == (abi.OFF_ADDR, abi.OFF_DATA, abi.OFF_COUNT, abi.OFF_SIZE, abi.OFF_VP_EPORT)


def test_buf_ioreq_bitfields_match(c_layout):
    ours = abi.BufIoreq(type=abi.IoreqType.COPY, is_read=True, size=4, addr=0xFEDCB, data=0xDEADBEEF)
    buf = bytearray(8)
    ours.pack_into(buf)
    assert buf.hex() == c_layout[2]
    assert abi.BufIoreq.unpack(bytes.fromhex(c_layout[2])) == ours
    page_size, slots_off = map(int, c_layout[3].split())
    assert slots_off == abi.BUF_PAGE_OFF_SLOTS
    assert page_size == abi.BUF_PAGE_OFF_SLOTS + abi.BUF_IOREQ_SLOT_NUM * abi.BUF_IOREQ_SIZE


def test_unknown_state_and_type_survive_unpacking():
    raw = bytearray(32)
    raw[30] = 0x0E  # state 14: not one Xen defines
    raw[31] = 0x42
    slot = abi.Ioreq.unpack(raw)
    assert slot.state == 14 and slot.type == 0x42


def _post(page, ptr: int, type_: int, size: int, addr: int, data: int) -> int:
    abi.BufIoreq(type=type_, is_read=False, size=size, addr=addr, data=data).pack_into(page, abi.buf_slot_offset(ptr))
    return ptr + 1


def test_buffered_ring_is_drained_in_order_with_8_byte_pairs_across_the_wrap():
    page = bytearray(abi.PAGE_SIZE)
    start = abi.BUF_IOREQ_SLOT_NUM - 2  # the ring wraps at 511 slots (Xen keeps the pointers below 2 * 511)
    struct.pack_into("<II", page, 0, start, start)
    wr = start
    wr = _post(page, wr, abi.IoreqType.COPY, 4, 0x10, 0xAAAA)
    wr = _post(page, wr, abi.IoreqType.COPY, 8, 0x20, 0x44332211)
    wr = _post(page, wr, abi.IoreqType.COPY, 8, 0x20, 0x88776655)  # high half rides in the next slot
    wr = _post(page, wr, abi.IoreqType.PIO, 1, 0x3F8, 0x41)
    struct.pack_into("<I", page, 4, wr & 0xFFFFFFFF)
    assert abi.drain_buffered_page(page) == [
        (abi.IoreqType.COPY, 0x10, 4, 0xAAAA),
        (abi.IoreqType.COPY, 0x20, 8, 0x8877665544332211),
        (abi.IoreqType.PIO, 0x3F8, 1, 0x41),
    ]
    assert struct.unpack_from("<I", page, 0)[0] == wr & 0xFFFFFFFF
    assert abi.drain_buffered_page(page) == []


def test_buffered_ring_with_corrupt_pointers_is_refused():
    page = bytearray(abi.PAGE_SIZE)
    struct.pack_into("<II", page, 0, 0, 600)
    with pytest.raises(ValueError, match="corrupt"):
        abi.drain_buffered_page(page)
