"""The shadow-ring arena: the memfd, and the allocator of ranges inside it."""

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.arena import Arena, ArenaFull


@pytest.fixture
def arena():
    a = Arena(4096)
    yield a
    a.close()


def test_memfd_is_shared_with_the_mapping(arena):
    info = os.fstat(arena.fd)
    assert stat.S_ISREG(info.st_mode) and info.st_size == 4096
    assert "memfd:xen-vhost-bridge-arena" in os.readlink(f"/proc/self/fd/{arena.fd}")
    arena.buf[100:105] = b"hello"
    assert os.pread(arena.fd, 5, 100) == b"hello"
    os.pwrite(arena.fd, b"daemon", 2000)
    assert bytes(arena.buf[2000:2006]) == b"daemon"
    assert not os.get_inheritable(arena.fd)


def test_u16_is_the_same_memory_as_little_endian_words(arena):
    """What ring indices are written with: word i is bytes 2i..2i+1, little
    endian as virtio wants, and the daemon's mapping sees it."""
    arena.u16[0x802 >> 1] = 0xBEEF
    assert bytes(arena.buf[0x802:0x804]) == b"\xef\xbe"
    assert os.pread(arena.fd, 2, 0x802) == b"\xef\xbe"
    os.pwrite(arena.fd, b"\x34\x12", 0x804)
    assert arena.u16[0x804 >> 1] == 0x1234
    assert len(arena.u16) == arena.size // 2


def test_close_releases_fd_and_is_idempotent():
    a = Arena(128)
    fd = a.fd
    a.close()
    a.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError):
        a.buf[0]
    with pytest.raises(ValueError):
        a.u16[0]


def test_context_manager_closes():
    with Arena(256) as a:
        a.buf[0] = 1
    assert a.closed


@pytest.mark.parametrize("size, align", [(0, 64), (100, 64), (-64, 64), (4096, 48), (4096, 0), (4095, 1)])
def test_bad_geometry_is_refused(size, align):
    with pytest.raises(ValueError):
        Arena(size, align=align)


def test_alloc_rounds_to_the_granule_and_aligns(arena):
    a = arena.alloc(1)
    b = arena.alloc(65)
    c = arena.alloc(64)
    assert (a, b, c) == (0, 64, 192)
    assert arena.free_bytes == 4096 - 256
    assert arena.allocation_count == 3


def test_zero_byte_buffer_still_takes_a_granule(arena):
    a = arena.alloc(0)
    b = arena.alloc(0)
    assert a != b
    assert arena.free_bytes == 4096 - 128


def test_alloc_returns_none_when_full_and_succeeds_after_free(arena):
    a = arena.alloc(4000)
    assert arena.alloc(128) is None
    assert arena.largest_free == 64
    arena.free(a)
    assert arena.alloc(4096) == 0


def test_free_coalesces_in_any_order(arena):
    offsets = [arena.alloc(512) for _ in range(8)]
    assert arena.free_bytes == 0 and arena.largest_free == 0
    for i in (1, 3, 5, 7, 0, 2, 6, 4):
        arena.free(offsets[i])
    assert arena.free_bytes == 4096
    assert arena.largest_free == 4096
    assert arena.alloc(4096) == 0


def test_first_fit_reuses_the_lowest_hole(arena):
    offsets = [arena.alloc(256) for _ in range(3)]
    arena.free(offsets[1])
    assert arena.alloc(128) == offsets[1]
    assert arena.alloc(256) == offsets[2] + 256  # the rest of the hole is too small
    assert arena.alloc(128) == offsets[1] + 128


def test_double_free_and_unknown_offset_are_refused(arena):
    a = arena.alloc(64)
    arena.free(a)
    with pytest.raises(ValueError):
        arena.free(a)
    with pytest.raises(ValueError):
        arena.free(12345)
    with pytest.raises(ValueError):
        arena.alloc(-1)


def test_reservations_come_first_and_are_aligned(arena):
    desc = arena.reserve(16 * 8, 16)
    avail = arena.reserve(6 + 2 * 8, 2)
    used = arena.reserve(6 + 8 * 8, 4)
    assert (desc, avail, used) == (0, 128, 192)
    assert arena.reserved_bytes == 128 + 64 + 128
    assert arena.free_bytes == 4096 - 320
    assert arena.max_alloc == 4096 - 320
    assert arena.fits_ever(4096 - 320) and not arena.fits_ever(4096 - 320 + 1)
    assert arena.alloc(1) == 320


def test_reservation_with_larger_alignment_leaves_usable_padding(arena):
    arena.reserve(64)
    page = arena.reserve(100, 1024)
    assert page == 1024
    # [64, 1024) is free and usable; [1152, 4096) too.
    assert arena.free_bytes == 4096 - 64 - 128
    assert arena.max_alloc == 4096 - 1152
    assert arena.alloc(960) == 64


def test_fits_ever_ignores_current_allocations(arena):
    arena.reserve(1024)
    arena.alloc(3000)
    assert arena.alloc(1024) is None
    assert arena.fits_ever(3072)
    assert not arena.fits_ever(3073)
    assert not arena.fits_ever(-1)
    assert arena.fits_ever(0)


def test_reserve_too_large_raises_arena_full(arena):
    with pytest.raises(ArenaFull):
        arena.reserve(4097)
    arena.alloc(4000)
    with pytest.raises(ArenaFull):
        arena.reserve(128)
    with pytest.raises(ValueError):
        arena.reserve(0)
    with pytest.raises(ValueError):
        arena.reserve(16, 3)


def test_unreserve_restores_space_and_max_alloc(arena):
    a = arena.reserve(64)
    b = arena.reserve(64)
    assert arena.max_alloc == 4096 - 128
    arena.unreserve(a)
    assert arena.max_alloc == 4096 - 128  # [0, 64) and [128, 4096) are separate gaps
    arena.unreserve(b)
    assert arena.max_alloc == 4096 and arena.free_bytes == 4096 and arena.largest_free == 4096
    with pytest.raises(ValueError):
        arena.unreserve(b)
    c = arena.alloc(64)
    with pytest.raises(ValueError):
        arena.unreserve(c)  # a buffer is not a reservation
    with pytest.raises(ValueError):
        arena.free(arena.reserve(64))  # and the other way round


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1500), st.integers(0, 63)), max_size=60),
       st.sampled_from([16, 64, 256]))
def test_allocator_never_overlaps_and_never_leaks(ops, align):
    size = 4096
    with Arena(size, align=align) as arena:
        ring = arena.reserve(100, 16)
        live: dict[int, int] = {}
        for is_alloc, nbytes, pick in ops:
            if is_alloc or not live:
                fits_now = arena.largest_free >= -(-max(nbytes, 1) // align) * align
                offset = arena.alloc(nbytes)
                assert (offset is not None) == fits_now
                if offset is None:
                    continue
                assert offset % align == 0
                assert offset + nbytes <= size
                for other, other_len in live.items():
                    assert offset + max(nbytes, 1) <= other or other + other_len <= offset
                assert offset >= ring + 100 or offset + max(nbytes, 1) <= ring
                live[offset] = max(nbytes, 1)
            else:
                victim = sorted(live)[pick % len(live)]
                del live[victim]
                arena.free(victim)
            used = sum(-(-n // align) * align for n in live.values())
            assert arena.free_bytes == size - arena.reserved_bytes - used
            assert arena.allocation_count == len(live)
        for offset in list(live):
            arena.free(offset)
        assert arena.free_bytes == size - arena.reserved_bytes
        assert arena.largest_free == arena.max_alloc == size - arena.reserved_bytes
