"""Guest memory through the Hypervisor interface of a real simulator
process: foreign mappings of guest frames (map_guest_pages), the
simulator's counters of what was mapped, and grants - the guest grants
frames through SimGuest, the device model maps the references."""

from __future__ import annotations

import errno

import pytest
import trio

from xen.hypervisor import XEN_PAGE_SIZE, GuestMapping, GuestMemoryFault
from xen.sim.client import SimHypervisorError
from xen.sim.guest import GuestRequestError, SimGuest
from xen.sim.guest_memory import grant_address, grant_page_count, grant_ref_of, is_grant_address

PAGE = XEN_PAGE_SIZE
RAM0 = 0x40000000
GFN0 = RAM0 // PAGE



def pattern(tag: int, length: int = PAGE) -> bytes:
    return bytes((tag + i) & 0xFF for i in range(length))


def fault_errno(excinfo) -> int:
    assert isinstance(excinfo.value, GuestMemoryFault)
    return excinfo.value.errno


# --- foreign mappings ---------------------------------------------------------------


async def test_the_layout_is_the_guests_ram_banks(start_sim, connect):
    assert connect(start_sim(ram_mib=64)).guest_ram_layout() == [(RAM0, 64 << 20)]
    big = connect(start_sim(ram_mib=3072 + 16))
    assert big.guest_ram_layout() == [(RAM0, 3 << 30), (0x200000000, 16 << 20)]


async def test_mapped_pages_are_the_pages_the_guest_sees(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        gfn = GFN0 + 0x123
        guest.ram.write(gfn * PAGE, pattern(1, 3 * PAGE))
        mapping = hv.map_guest_pages(gfn, 3)
        assert isinstance(mapping, GuestMapping)
        assert len(mapping.view) == 3 * PAGE and not mapping.view.readonly
        assert bytes(mapping.view) == pattern(1, 3 * PAGE)
        mapping.view[PAGE + 5 : PAGE + 10] = b"hello"
        assert guest.ram.read(gfn * PAGE + PAGE + 5, 5) == b"hello"
        assert guest.ram.read(gfn * PAGE - 1, 1) == b"\0"  # nothing around it was touched
        last = hv.map_guest_pages(GFN0 + (64 << 20) // PAGE - 1, 1)  # the last frame of RAM
        last.view[-1] = 0x5A
        assert guest.ram.read(RAM0 + (64 << 20) - 1, 1) == b"\x5a"
        mapping.close()
        mapping.close()
        with pytest.raises(ValueError):
            mapping.view[0]
        last.close()


async def test_frames_that_are_not_ram_fault(start_sim, connect):
    hv = connect(start_sim(ram_mib=64))
    end = GFN0 + (64 << 20) // PAGE
    for gfn, count, first_bad in (
        (0, 1, 0),
        (GFN0 - 1, 2, GFN0 - 1),
        (end, 1, end),
        (end - 2, 3, end),
        (0x2000000 // PAGE, 1, 0x2000000 // PAGE),  # the virtio-mmio window is not RAM
    ):
        with pytest.raises(GuestMemoryFault) as exc:
            hv.map_guest_pages(gfn, count)
        assert fault_errno(exc) == errno.EINVAL
        assert f"gfn {first_bad:#x} " in str(exc.value), exc.value
    with pytest.raises(ValueError):
        hv.map_guest_pages(GFN0, 0)


async def test_a_range_across_a_bank_edge_faults(start_sim, connect):
    sim = start_sim(ram_mib=3072 + 4)
    hv = connect(sim)
    bank0_end = (RAM0 + (3 << 30)) // PAGE
    bank1 = 0x200000000 // PAGE
    with pytest.raises(GuestMemoryFault) as exc:
        hv.map_guest_pages(bank0_end - 1, 2)
    assert f"gfn {bank0_end:#x} " in str(exc.value)
    async with SimGuest.open(sim.control_path) as guest:
        guest.ram.write(bank0_end * PAGE - 4, b"end0")
        guest.ram.write(bank1 * PAGE, b"bnk1")
        with hv.map_guest_pages(bank0_end - 1, 1) as a, hv.map_guest_pages(bank1, 1) as b:
            assert bytes(a.view[-4:]) == b"end0" and bytes(b.view[:4]) == b"bnk1"


async def test_the_simulator_counts_what_was_mapped(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    other = connect(sim)
    assert hv.stats() == {
        "map_foreign_calls": 0,
        "map_foreign_pages": 0,
        "map_grant_calls": 0,
        "map_grant_pages": 0,
        "grants_active": 0,
        "xs_watches": 0,
        "kernel_kicks": 0,
        "kernel_irqs": 0,
        "ioreq_servers": 0,
    }
    hv.map_guest_pages(GFN0, 4).close()
    other.map_guest_pages(GFN0 + 10, 1).close()
    with pytest.raises(GuestMemoryFault):
        hv.map_guest_pages(0, 1)  # refused: not counted
    stats = hv.stats()
    assert (stats["map_foreign_calls"], stats["map_foreign_pages"]) == (2, 5)
    async with SimGuest.open(sim.control_path) as guest:
        ref = await guest.grant_access_seq(GFN0 + 100, 3)
        hv.map_grant_refs([ref, ref + 2]).close()
        assert hv.stats() == {**stats, "map_grant_calls": 1, "map_grant_pages": 2, "grants_active": 3}


async def test_a_mapping_outlived_by_a_slice_is_not_pulled_away(start_sim, connect):
    hv = connect(start_sim(ram_mib=16))
    mapping = hv.map_guest_pages(GFN0, 1)
    piece = mapping.view[0:16]
    mapping.close()  # the slice keeps the pages mapped until it goes
    piece[0] = 1
    assert piece[0] == 1
    piece.release()


# --- grants -----------------------------------------------------------------------------


async def test_a_granted_page_is_shared_with_the_device_model(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        gfn = GFN0 + 0x40
        guest.ram.write(gfn * PAGE, pattern(7))
        with trio.fail_after(5):
            ref = await guest.grant_access(gfn)
        assert ref == 8  # 0-7 are reserved
        with hv.map_grant_refs([ref]) as mapping:
            assert isinstance(mapping, GuestMapping)
            assert bytes(mapping.view) == pattern(7)
            mapping.view[100:104] = b"back"
        assert guest.ram.read(gfn * PAGE + 100, 4) == b"back"
        assert await guest.grant_access(gfn + 1) == 9  # consecutive calls, consecutive refs


async def test_consecutive_refs_map_as_one_view_of_scattered_pages(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        gfns = [GFN0 + 0x300, GFN0 + 0x100, GFN0 + 0x101, GFN0 + 0x200]
        for i, gfn in enumerate(gfns):
            guest.ram.write(gfn * PAGE, pattern(i * 16))
        refs = [await guest.grant_access(gfn) for gfn in gfns]
        assert refs == list(range(refs[0], refs[0] + 4))
        mapping = hv.map_grant_refs(refs)
        assert len(mapping.view) == 4 * PAGE
        assert bytes(mapping.view) == b"".join(pattern(i * 16) for i in range(4))
        mapping.view[PAGE - 2 : PAGE + 2] = b"ABCD"  # a write across two unrelated frames
        assert guest.ram.read(gfns[0] * PAGE + PAGE - 2, 2) == b"AB"
        assert guest.ram.read(gfns[1] * PAGE, 2) == b"CD"
        mapping.close()
        mapping.close()
        # xen-grant-dma's way: one request, consecutive refs for consecutive frames
        first = await guest.grant_access_seq(GFN0 + 0x500, 3)
        assert first == refs[-1] + 1
        guest.ram.write((GFN0 + 0x500) * PAGE, pattern(3, 3 * PAGE))
        with hv.map_grant_refs(range(first, first + 3)) as seq:
            assert bytes(seq.view) == pattern(3, 3 * PAGE)
        with hv.map_grant_refs([refs[2], refs[2]]) as twice:  # the same grant twice is fine
            twice.view[0] = 0xEE
            assert twice.view[PAGE] == 0xEE


async def test_refs_that_are_not_granted_fault(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        for ref in (0, 7, 8, 100):
            with pytest.raises(GuestMemoryFault) as exc:
                hv.map_grant_refs([ref])
            assert fault_errno(exc) == errno.EINVAL and f"grant reference {ref} " in str(exc.value)
        ref = await guest.grant_access(GFN0)
        ok = await guest.grant_access(GFN0 + 1)
        await guest.end_access(ref)  # revoked
        with pytest.raises(GuestMemoryFault) as exc:
            hv.map_grant_refs([ok, ref])
        assert fault_errno(exc) == errno.EINVAL and "revoked" in str(exc.value)
        with pytest.raises(GuestRequestError) as exc:
            await guest.end_access(ref)
        assert exc.value.errno == errno.EINVAL
        assert await guest.grant_access(GFN0 + 2) == ref  # the lowest free ref comes back
        other = await guest.grant_access(GFN0, backend_domid=2)
        with pytest.raises(GuestMemoryFault, match="granted to domain 2"):
            hv.map_grant_refs([other])
        bogus = await guest.grant_access(0x2000000 // PAGE)  # not RAM: Xen's GNTST_bad_page at map time
        with pytest.raises(GuestMemoryFault, match="not RAM"):
            hv.map_grant_refs([bogus])
        with pytest.raises(GuestRequestError) as exc:
            await guest.grant_access_seq(GFN0, 1 << 20)  # more than the table holds
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(GuestMemoryFault):
            hv.map_grant_refs([-1])
    assert hv.stats()["map_grant_calls"] == 0


async def test_read_only_grants_are_refused_read_write(start_sim, connect):
    sim = start_sim(ram_mib=16)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        ro = await guest.grant_access(GFN0, readonly=True)
        with pytest.raises(GuestMemoryFault) as exc:
            hv.map_grant_refs([ro])
        assert fault_errno(exc) == errno.EPERM and "read-only" in str(exc.value)
        rw = await guest.grant_access_seq(GFN0 + 1, 2, readonly=False)
        hv.map_grant_refs([rw, rw + 1]).close()


async def test_grant_dma_addresses(start_sim, connect):
    sim = start_sim(ram_mib=16)
    hv = connect(sim)
    assert grant_address(8) == 0x8000000000008000
    assert grant_ref_of(grant_address(9, 0x123)) == (9, 0x123)
    assert not is_grant_address(RAM0) and grant_page_count(0xFFF, 2) == 2
    async with SimGuest.open(sim.control_path) as guest:
        gpa = RAM0 + 0x10FF0  # 0x20 bytes that straddle a page boundary
        guest.ram.write(gpa, pattern(9, 0x20))
        addr = await guest.grant_dma_map(gpa, 0x20)
        ref, offset = grant_ref_of(addr)
        assert offset == 0xFF0
        with hv.map_grant_refs(range(ref, ref + grant_page_count(offset, 0x20))) as mapping:
            assert bytes(mapping.view[offset : offset + 0x20]) == pattern(9, 0x20)
        assert hv.stats()["grants_active"] == 2
        await guest.grant_dma_unmap(addr, 0x20)
        assert hv.stats()["grants_active"] == 0


async def test_requests_belong_to_their_role(start_sim, connect):
    sim = start_sim(ram_mib=16)
    hv = connect(sim)
    with pytest.raises(SimHypervisorError, match="not available to a device model"):
        hv._call("grant_access", gfn=GFN0, readonly=False)
    async with SimGuest.open(sim.control_path) as guest:
        with pytest.raises(GuestRequestError, match="not available to the guest") as exc:
            await guest._request("map_foreign", domid=1, gfn=GFN0, count=1)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(GuestRequestError, match="unknown field"):
            await guest._request("grant_access", gfn=GFN0, readonly=False, bogus=1)
        assert await guest.grant_access(GFN0) == 8  # the connection is still fine
