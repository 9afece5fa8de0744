"""MappedGuestMemory: on-demand, bounded mappings of guest RAM, against a
stand-in hypervisor whose guest RAM is a memfd and which records every
mapping it hands out (the simulator's own map_guest_pages is covered by the
simulator's tests and the shadow end-to-end tests)."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.guest_pages import GRANT_ADDRESS, MappedGuestMemory
from bridge.memory import OutsideGuestRam
from xen.hypervisor import XEN_PAGE_SIZE, GuestMapping, GuestMemoryFault

BANK0 = (0x4000_0000, 1 << 20)
BANK1 = (0x2_0000_0000, 256 << 10)


class Mapping(GuestMapping):
    def __init__(self, owner: "PagesHv", mm: mmap.mmap, gfn: int, count: int) -> None:
        self.owner = owner
        self.mm = mm
        self.view = memoryview(mm)
        self.gfn, self.count = gfn, count
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.view.release()
            self.mm.close()
            self.owner.live.remove(self)


class PagesHv:
    """Guest RAM in a memfd: BANK0 then BANK1, back to back."""

    def __init__(self, banks=(BANK0, BANK1), holes=()) -> None:
        self.banks = list(banks)
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, sum(size for _, size in banks))
        self.ram = mmap.mmap(self.fd, sum(size for _, size in banks))
        self.holes = set(holes)  # gfns that fail to map (ballooned out)
        self.live: list = []
        self.requests: list[tuple[int, int]] = []
        self.grants: dict[int, int] = {}  # ref -> gfn

    def guest_ram_layout(self):
        return self.banks

    def offset(self, gpa: int) -> int:
        base = 0
        for start, size in self.banks:
            if start <= gpa < start + size:
                return base + gpa - start
            base += size
        raise AssertionError(f"{gpa:#x} is not RAM")

    def map_guest_pages(self, gfn: int, count: int) -> Mapping:
        self.requests.append((gfn, count))
        first, last = gfn * XEN_PAGE_SIZE, (gfn + count) * XEN_PAGE_SIZE
        # The cache must never ask for a frame outside the banks.
        assert any(s <= first and last <= s + n for s, n in self.banks), f"asked for {first:#x}-{last:#x}"
        for page in range(gfn, gfn + count):
            if page in self.holes:
                raise GuestMemoryFault(f"gfn {page:#x}: EFAULT")
        m = Mapping(self, mmap.mmap(self.fd, last - first, offset=self.offset(first)), gfn, count)
        self.live.append(m)
        return m

    def map_grant_refs(self, refs) -> "GrantMapping":
        """Each reference's page, in one contiguous view (gntdev gives one
        mapping); here the pages are copied in and out, which is enough to
        see what the cache reads and writes."""
        for ref in refs:
            if ref not in self.grants:
                raise GuestMemoryFault(f"grant reference {ref}: EINVAL")
        m = GrantMapping(self, [self.grants[r] for r in refs])
        self.live.append(m)
        return m

    def close(self) -> None:
        self.ram.close()
        os.close(self.fd)


class GrantMapping(GuestMapping):
    def __init__(self, owner: PagesHv, gfns: list[int]) -> None:
        self.owner, self.gfns = owner, gfns
        self.buf = bytearray()
        for gfn in gfns:
            off = owner.offset(gfn * XEN_PAGE_SIZE)
            self.buf += owner.ram[off : off + XEN_PAGE_SIZE]
        self.view = memoryview(self.buf)
        self.gfn = None
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for i, gfn in enumerate(self.gfns):  # write back what the user changed
                off = self.owner.offset(gfn * XEN_PAGE_SIZE)
                self.owner.ram[off : off + XEN_PAGE_SIZE] = self.buf[i * XEN_PAGE_SIZE : (i + 1) * XEN_PAGE_SIZE]
            self.view.release()
            self.owner.live.remove(self)


@pytest.fixture
def hv():
    h = PagesHv()
    yield h
    h.close()


def test_reads_and_writes_reach_guest_ram(hv):
    mem = MappedGuestMemory(hv)
    gpa = BANK0[0] + 0x1234
    mem.write(gpa, b"hello")
    assert hv.ram[0x1234:0x1239] == b"hello"
    hv.ram[0x5000:0x5004] = b"\x01\x02\x03\x04"
    assert mem.read(BANK0[0] + 0x5000, 4) == b"\x01\x02\x03\x04"
    # Both accesses fall in the first 64 KiB chunk: one mapping.
    assert hv.requests == [(BANK0[0] >> 12, 16)]
    mem.close()
    assert hv.live == []


def test_an_access_across_chunks_is_split_and_correct(hv):
    mem = MappedGuestMemory(hv)
    gpa = BANK0[0] + 0x10000 - 3
    data = bytes(range(200))
    mem.write(gpa, data)
    assert hv.ram[0x10000 - 3 : 0x10000 - 3 + 200] == data
    assert mem.read(gpa, 200) == data
    assert len(hv.requests) == 2
    mem.close()


@pytest.mark.parametrize(
    "gpa,length",
    [
        (BANK0[0] - 1, 2),  # starts below RAM
        (BANK0[0] + BANK0[1] - 2, 4),  # runs off the end of bank 0
        (BANK1[0] + BANK1[1], 1),  # after the last bank
        (0, 16),
        (BANK1[0] - 8, 16),  # between the banks into bank 1
    ],
)
def test_outside_ram_is_refused_before_anything_is_mapped_or_written(hv, gpa, length):
    mem = MappedGuestMemory(hv)
    with pytest.raises(OutsideGuestRam):
        mem.read(gpa, length)
    with pytest.raises(OutsideGuestRam):
        mem.write(gpa, b"\xff" * length)
    with pytest.raises(OutsideGuestRam):
        mem.check_range(gpa, length)
    assert hv.requests == []
    assert hv.ram[:] == bytes(len(hv.ram))
    mem.close()


def test_a_frame_that_cannot_be_mapped_is_outside_guest_ram(hv):
    hv.holes.add((BANK0[0] >> 12) + 20)
    mem = MappedGuestMemory(hv)
    with pytest.raises(OutsideGuestRam, match="cannot be mapped"):
        mem.read(BANK0[0] + 20 * XEN_PAGE_SIZE, 8)
    # A write over several chunks that reaches the hole writes nothing at all.
    with pytest.raises(OutsideGuestRam):
        mem.write(BANK0[0] + 0xF000, b"\xee" * 0x8000)
    assert hv.ram[:] == bytes(len(hv.ram))
    mem.close()


def test_the_cache_stays_within_its_bound_and_unmaps_what_it_evicts(hv):
    mem = MappedGuestMemory(hv, chunk_pages=4, max_bytes=3 * 4 * XEN_PAGE_SIZE)
    for i in range(10):
        mem.write(BANK0[0] + i * 4 * XEN_PAGE_SIZE, bytes([i]))
        assert len(hv.live) <= 3
        assert mem.mapped_bytes <= 3 * 4 * XEN_PAGE_SIZE
    assert mem.evictions == 7
    # Least recently used goes first: touch chunk 7, then map a new one;
    # chunk 8 (now the oldest) is evicted, 7 stays.
    mem.read(BANK0[0] + 7 * 4 * XEN_PAGE_SIZE, 1)
    mem.read(BANK0[0] + 0, 1)
    assert sorted(m.gfn for m in hv.live) == [BANK0[0] >> 12, (BANK0[0] >> 12) + 28, (BANK0[0] >> 12) + 36]
    for i in range(10):
        assert hv.ram[i * 4 * XEN_PAGE_SIZE] == i
    mem.close()
    assert hv.live == []


def test_a_chunk_is_clipped_to_a_bank_that_is_not_chunk_aligned():
    hv = PagesHv(banks=[(0x4000_3000, 0x5000)])
    try:
        mem = MappedGuestMemory(hv, chunk_pages=4)  # 16 KiB chunks; the bank starts mid-chunk
        mem.write(0x4000_3000, b"AB")
        mem.write(0x4000_7FFE, b"YZ")
        assert hv.ram[0:2] == b"AB" and hv.ram[0x4FFE:0x5000] == b"YZ"
        assert mem.read(0x4000_3FFF, 2) == bytes(2)
        assert hv.requests == [(0x40003, 1), (0x40004, 4)]
        with pytest.raises(OutsideGuestRam):
            mem.read(0x4000_2FFF, 2)
        mem.close()
    finally:
        hv.close()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from([0, 1]),
            st.integers(0, BANK0[1] - 1),
            st.integers(1, 3 * XEN_PAGE_SIZE),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_random_accesses_match_a_plain_buffer(ops):
    hv = PagesHv(banks=[BANK0])
    try:
        mem = MappedGuestMemory(hv, chunk_pages=2, max_bytes=4 * XEN_PAGE_SIZE)
        model = bytearray(BANK0[1])
        for is_write, off, length, fill in ops:
            length = min(length, BANK0[1] - off)
            if is_write:
                data = bytes((fill + k) & 0xFF for k in range(length))
                mem.write(BANK0[0] + off, data)
                model[off : off + length] = data
            else:
                assert mem.read(BANK0[0] + off, length) == bytes(model[off : off + length])
            assert len(hv.live) <= 2
        assert hv.ram[:] == bytes(model)
        mem.close()
    finally:
        hv.close()


# --- grant addresses ------------------------------------------------------------


def grant(ref: int, offset: int = 0) -> int:
    return GRANT_ADDRESS | (ref << 12) + offset


def test_grant_addresses_reach_the_granted_pages_and_stay_unmapped(hv):
    # Three consecutive references for three scattered pages of bank 0.
    gfns = [(BANK0[0] >> 12) + n for n in (40, 7, 100)]
    hv.grants.update({8: gfns[0], 9: gfns[1], 10: gfns[2]})
    mem = MappedGuestMemory(hv)
    data = bytes(range(256)) * 24  # 6 KiB from 0x800 into ref 8: ends in ref 9
    mem.write(grant(8, 0x800), data)
    assert hv.live == []  # mapped for the access only
    assert hv.ram[40 * 4096 + 0x800 : 41 * 4096] == data[:0x800]
    assert hv.ram[7 * 4096 : 7 * 4096 + 0x1000] == data[0x800 : 0x1800]
    assert mem.read(grant(9, 0xFF0), 0x20) == data[0x17F0:0x1800] + hv.ram[100 * 4096 : 100 * 4096 + 0x10]
    assert hv.requests == []  # no foreign mapping of RAM for grants
    mem.close()


def test_a_reference_the_guest_did_not_grant_is_outside_guest_ram(hv):
    hv.grants[8] = BANK0[0] >> 12
    mem = MappedGuestMemory(hv)
    with pytest.raises(OutsideGuestRam, match="cannot be mapped"):
        mem.read(grant(8, 0xFFF), 2)  # runs into ref 9, never granted
    with pytest.raises(OutsideGuestRam, match="past the last grant reference"):
        mem.check_range(grant(0xFFFF_FFFF, 0xFFF), 2)
    mem.check_range(grant(8), 4096)  # only Xen knows: checked when mapped
    assert hv.live == []
    mem.close()


def test_pinned_ring_grants_stay_mapped_until_unpinned(hv):
    hv.grants.update({20: (BANK0[0] >> 12) + 1, 21: (BANK0[0] >> 12) + 2})
    mem = MappedGuestMemory(hv)
    handle = mem.pin(grant(20), 2 * 4096)
    assert len(hv.live) == 1 and mem.grant_maps == 1
    mem.write(grant(21, 8), b"used")
    assert mem.read(grant(20, 4), 4) == bytes(4)
    assert mem.grant_maps == 1 and len(hv.live) == 1  # served by the pin
    mem.unpin(handle)
    assert hv.live == []
    assert hv.ram[2 * 4096 + 8 : 2 * 4096 + 12] == b"used"
    assert mem.pin(BANK0[0], 64) is None  # plain RAM needs no pin
    mem.close()
