import random
import time

import pytest

from xen.sim.guest_memory import DEFAULT_RESERVE_LOW, GRANULE, GuestAllocator, GuestMemoryExhausted

BASE = 0x4000_0000
SIZE = 16 << 20


def test_allocations_are_aligned_inside_the_bank_and_above_the_reservation():
    a = GuestAllocator(BASE, SIZE)
    seen = []
    for size, align in [(1, 1), (16, 16), (100, 64), (4096, 4096), (7, 2), (65536, 65536), (24, 8)]:
        gpa = a.allocate(size, align)
        assert gpa % max(align, GRANULE) == 0
        assert BASE + DEFAULT_RESERVE_LOW <= gpa and gpa + size <= BASE + SIZE
        assert a.size_of(gpa) >= size and a.size_of(gpa) % GRANULE == 0
        seen.append((gpa, a.size_of(gpa)))
    seen.sort()
    for (g1, s1), (g2, _) in zip(seen, seen[1:]):
        assert g1 + s1 <= g2, "allocations overlap"
    a.check_consistency()


def test_reserve_low_is_configurable():
    a = GuestAllocator(BASE, 1 << 20, reserve_low=0)
    assert a.allocate(16) == BASE
    with pytest.raises(ValueError):
        GuestAllocator(BASE, 1 << 20, reserve_low=1 << 20)


def test_free_coalesces_back_to_one_range():
    a = GuestAllocator(BASE, SIZE)
    capacity = a.free_bytes
    gpas = [a.allocate(4096 * (i % 3 + 1), 4096 if i % 2 else 16) for i in range(50)]
    assert a.free_bytes < capacity
    for gpa in gpas[::2] + gpas[1::2]:
        a.free(gpa)
        a.check_consistency()
    assert a.free_bytes == capacity == a.largest_free
    assert a.free_fragments == 1
    assert a.allocation_count == 0 and a.allocated_bytes == 0


def test_alignment_padding_is_left_free_and_reused():
    a = GuestAllocator(BASE, SIZE, reserve_low=0)
    small = a.allocate(16)
    big = a.allocate(4096, 4096)
    assert big == BASE + 4096  # the gap after `small` stays free
    gap = a.allocate(4096 - 16)
    assert gap == small + 16
    a.check_consistency()


def test_exhaustion_raises_a_clear_error():
    a = GuestAllocator(BASE, 1 << 20, reserve_low=0)
    a.allocate(512 << 10)
    with pytest.raises(GuestMemoryExhausted, match="exhausted: no 0x80010-byte"):
        a.allocate((512 << 10) + 16)
    assert isinstance(GuestMemoryExhausted("x"), MemoryError)


def test_fragmentation_exhaustion_reports_largest_block():
    a = GuestAllocator(BASE, 64 * 1024, reserve_low=0)
    blocks = [a.allocate(4096) for _ in range(16)]
    for gpa in blocks[::2]:
        a.free(gpa)
    assert a.free_bytes == 8 * 4096
    with pytest.raises(GuestMemoryExhausted, match="largest 0x1000"):
        a.allocate(8192)


def test_double_free_and_foreign_free_are_rejected():
    a = GuestAllocator(BASE, SIZE)
    gpa = a.allocate(64)
    a.free(gpa)
    with pytest.raises(ValueError, match="double free"):
        a.free(gpa)
    other = a.allocate(64)
    with pytest.raises(ValueError):
        a.free(other + 16)


def test_bad_arguments():
    a = GuestAllocator(BASE, SIZE)
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(ValueError):
        a.allocate(16, 3)


def test_reserve_exact_range():
    a = GuestAllocator(BASE, SIZE, reserve_low=0)
    a.reserve(BASE + 0x2000, 0x1000)
    assert a.allocate(0x2000) == BASE
    assert a.allocate(0x1000) == BASE + 0x3000
    with pytest.raises(ValueError):
        a.reserve(BASE + 0x2800, 0x100)
    a.free(BASE + 0x2000)
    a.check_consistency()


def test_thousands_of_random_alloc_free_stay_consistent_and_fast():
    rng = random.Random(1234)
    a = GuestAllocator(BASE, 64 << 20)
    live: dict[int, int] = {}
    start = time.perf_counter()
    for step in range(20000):
        if live and (rng.random() < 0.45 or len(live) > 3000):
            gpa = rng.choice(list(live)) if step % 50 == 0 else next(iter(live))
            a.free(gpa)
            del live[gpa]
        else:
            size = rng.choice([16, 17, 64, 512, 4096, 9000, 65536])
            align = rng.choice([1, 16, 512, 4096])
            gpa = a.allocate(size, align)
            assert gpa % max(align, GRANULE) == 0
            live[gpa] = size
        if step % 2000 == 0:
            a.check_consistency()
    spans = sorted((g, a.size_of(g)) for g in live)
    for (g1, s1), (g2, _) in zip(spans, spans[1:]):
        assert g1 + s1 <= g2
    for gpa in list(live):
        a.free(gpa)
    assert a.free_fragments == 1
    assert time.perf_counter() - start < 20
