"""The simulated guest's DMA layer (xen/sim/guest_dma.py): the identity, and
xen-grant-dma-ops over a real simulator's grant table, seen from the device
model side through map_grant_refs and the simulator's grant counters."""

from __future__ import annotations

import errno

import pytest
import trio

from bridge import split_ring as sr
from xen.hypervisor import GuestMemoryFault
from xen.sim.guest import SimGuest
from xen.sim.guest_dma import IDENTITY_DMA, GrantDma, IdentityDma, dma_for_device
from xen.sim.guest_memory import GuestAllocator, grant_page_count, grant_ref_of, is_grant_address
from xen.sim.guest_virtqueue import GuestVirtqueue

PAGE = 4096


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag + i * 7) & 0xFF for i in range(length))


def grants_active(hv) -> int:
    return hv.stats()["grants_active"]


class DmView:
    """What a device model sees of a DMA (grant) address: the refs it names,
    mapped with map_grant_refs, and the bytes of the buffer in them."""

    def __init__(self, hv, addr: int, length: int) -> None:
        assert is_grant_address(addr), f"{addr:#x} is not a grant address"
        ref, self.offset = grant_ref_of(addr)
        self.refs = list(range(ref, ref + grant_page_count(self.offset, length)))
        self.length = length
        self.mapping = hv.map_grant_refs(self.refs)

    def read(self, at: int = 0, length: int | None = None) -> bytes:
        length = self.length - at if length is None else length
        return bytes(self.mapping.view[self.offset + at:self.offset + at + length])

    def write(self, at: int, data: bytes) -> None:
        self.mapping.view[self.offset + at:self.offset + at + len(data)] = data

    def close(self) -> None:
        self.mapping.close()


# -- the identity ---------------------------------------------------------------


async def test_identity_dma_is_the_identity():
    dma = IdentityDma()
    assert not dma.needs_calls and not IDENTITY_DMA.needs_calls
    assert await dma.map(0x4000_1234, 100, device_writes=False) == 0x4000_1234
    assert await dma.map(0x4000_1234, 100, device_writes=True) == 0x4000_1234
    assert await dma.map_coherent(0x4010_0000, 3 * PAGE) == 0x4010_0000
    await dma.unmap(0x4000_1234, 100)
    await dma.unmap_coherent(0x4010_0000, 3 * PAGE)


# -- grants, against the simulator ----------------------------------------------


async def test_a_three_page_buffer_gets_three_consecutive_refs(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        alloc = GuestAllocator(guest.ram.base, guest.ram.size)
        dma = GrantDma(guest)
        gpa = alloc.allocate(3 * PAGE, PAGE) + 0x80  # 0x80 into its first page: 3 pages for 2.5 pages of data
        length = 2 * PAGE + PAGE // 2
        guest.ram.write(gpa, pattern(3, length))
        assert grants_active(hv) == 0

        addr = await dma.map(gpa, length, device_writes=False)
        assert is_grant_address(addr) and addr >> 63 == 1
        ref, offset = grant_ref_of(addr)
        assert offset == 0x80
        assert addr == (1 << 63) | (ref << 12) + 0x80
        assert dma.refs_of(addr) == [ref, ref + 1, ref + 2]
        assert grants_active(hv) == 3
        assert dma.live == {addr: (gpa, length, False)} and dma.live_refs() == 3

        # The device model maps the refs and sees the guest's bytes, and what
        # it writes is in the guest's RAM (the grants are writable: see GrantDma).
        view = DmView(hv, addr, length)
        assert view.read() == pattern(3, length)
        view.write(PAGE, b"from the device")
        assert guest.ram.read(gpa + PAGE, 15) == b"from the device"
        view.close()

        await dma.unmap(addr, length)
        assert grants_active(hv) == 0 and not dma.live
        with pytest.raises(GuestMemoryFault):
            hv.map_grant_refs([ref])  # revoked
        with pytest.raises(ValueError, match="not a live mapping"):
            await dma.unmap(addr, length)
        # Consecutive refs again for the next buffer (the lowest free run).
        again = await dma.map(gpa, length, device_writes=True)
        assert grant_ref_of(again)[0] == ref
        with pytest.raises(ValueError, match="unmapped as"):
            await dma.unmap(again, 1)
        await dma.unmap(again, length)
        assert grants_active(hv) == 0
        assert (dma.maps, dma.unmaps) == (2, 2)


async def test_coherent_mappings_are_writable_and_counted_apart(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        dma = GrantDma(guest, readonly_grants=True)
        ring = guest.ram.base + 0x200000
        addr = await dma.map_coherent(ring, PAGE + 100)
        buf = await dma.map(ring + 0x10000, 16, device_writes=False)
        assert dma.live_refs(coherent=True) == 2 and dma.live_refs(coherent=False) == 1
        assert grants_active(hv) == 3
        hv.map_grant_refs(dma.refs_of(addr)).close()  # read-write, as xen_grant_dma_alloc grants it
        with pytest.raises(ValueError, match="streaming"):
            await dma.unmap(addr, PAGE + 100)  # a coherent mapping is not unmapped as a buffer
        await dma.unmap_coherent(addr, PAGE + 100)
        await dma.unmap(buf, 16)
        assert grants_active(hv) == 0


async def test_readonly_grants_are_linux_behaviour_but_the_device_model_maps_read_write(start_sim, connect):
    """Why GrantDma grants everything writable by default: Linux grants a
    DMA_TO_DEVICE buffer read-only, and a read-only grant cannot be mapped
    read-write, which is how the simulator's map_grant_refs (and the
    bridge) map."""
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        gpa = guest.ram.base + 0x300000
        linux = GrantDma(guest, readonly_grants=True)
        ro = await linux.map(gpa, 64, device_writes=False)
        rw = await linux.map(gpa, 64, device_writes=True)
        with pytest.raises(GuestMemoryFault) as info:
            hv.map_grant_refs(linux.refs_of(ro))
        assert info.value.errno == errno.EPERM
        hv.map_grant_refs(linux.refs_of(rw)).close()
        default = GrantDma(guest)
        also_rw = await default.map(gpa, 64, device_writes=False)
        hv.map_grant_refs(default.refs_of(also_rw)).close()
        for dma, addr in ((linux, ro), (linux, rw), (default, also_rw)):
            await dma.unmap(addr, 64)
        assert grants_active(hv) == 0


async def test_a_cancelled_map_still_returns_its_grant(start_sim, connect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        dma = GrantDma(guest)
        with trio.CancelScope() as scope:
            scope.cancel()
            addr = await dma.map(guest.ram.base + 0x300000, 64, device_writes=True)
            # The grant was made and reached us; the cancellation comes at
            # the next checkpoint, not in the middle of the request.
            assert grants_active(hv) == 1 and addr in dma.live
            await dma.unmap(addr, 64)  # shielded too
            assert grants_active(hv) == 0
            await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught


async def test_the_device_tree_picks_the_mode(start_sim):
    sim = start_sim(ram_mib=64, extra_args=["--virtio", "type=virtio,device2,grant_usage=1",
                                            "--virtio", "type=virtio,device2",
                                            "--virtio", "type=virtio,device2,backend=2"])
    async with SimGuest.open(sim.control_path) as guest:
        granted, plain, domu_backend = await guest.devices()
        dma = dma_for_device(guest, granted)
        assert isinstance(dma, GrantDma) and dma.guest is guest and dma.backend_domid == 0
        assert dma_for_device(guest, plain) is IDENTITY_DMA
        other = dma_for_device(guest, domu_backend)  # grant_usage defaults to on for a domU backend
        assert isinstance(other, GrantDma) and other.backend_domid == 2


# -- a virtqueue in grant mode, the device model side through grants ----------------


class DmQueue:
    """A device model's view of a split ring given by grant addresses."""

    def __init__(self, hv, size: int, desc: int, avail: int, used: int) -> None:
        self.hv = hv
        self.size = size
        self.desc = DmView(hv, desc, sr.desc_table_size(size))
        self.avail = DmView(hv, avail, sr.avail_ring_size(size))
        self.used = DmView(hv, used, sr.used_ring_size(size))
        self.last_avail = 0
        self.used_idx = 0
        self.addrs: list[int] = []

    def pop(self) -> tuple[int, list[tuple[int, int, int]]]:
        """The next chain: its head and (addr, len, flags) of each buffer."""
        avail_idx = sr.U16.unpack(self.avail.read(sr.AVAIL_IDX, 2))[0]
        assert avail_idx != self.last_avail, "nothing available"
        head = sr.U16.unpack(self.avail.read(sr.avail_ring_entry(self.last_avail % self.size), 2))[0]
        self.last_avail += 1
        bufs = []
        addr, length, flags, nxt = sr.DESC.unpack(self.desc.read(sr.DESC_SIZE * head, sr.DESC_SIZE))
        if flags & sr.VIRTQ_DESC_F_INDIRECT:
            self.addrs.append(addr)
            table = DmView(self.hv, addr, length)
            entries = [sr.DESC.unpack(table.read(sr.DESC_SIZE * i, sr.DESC_SIZE)) for i in range(length // 16)]
            table.close()
            index = 0
            while True:
                addr, length, flags, nxt = entries[index]
                bufs.append((addr, length, flags))
                if not flags & sr.VIRTQ_DESC_F_NEXT:
                    break
                index = nxt
        else:
            while True:
                bufs.append((addr, length, flags))
                if not flags & sr.VIRTQ_DESC_F_NEXT:
                    break
                addr, length, flags, nxt = sr.DESC.unpack(self.desc.read(sr.DESC_SIZE * nxt, sr.DESC_SIZE))
        self.addrs += [addr for addr, _, _ in bufs]
        return head, bufs

    def push_used(self, head: int, length: int) -> None:
        self.used.write(sr.used_ring_entry(self.used_idx % self.size), sr.USED_ELEM.pack(head, length))
        self.used_idx += 1
        self.used.write(sr.USED_IDX, sr.U16.pack(self.used_idx))

    def close(self) -> None:
        for view in (self.desc, self.avail, self.used):
            view.close()


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
async def test_a_virtqueue_in_grant_mode_end_to_end(start_sim, connect, indirect):
    sim = start_sim(ram_mib=64)
    hv = connect(sim)
    async with SimGuest.open(sim.control_path) as guest:
        alloc = GuestAllocator(guest.ram.base, guest.ram.size)
        dma = GrantDma(guest)

        async def notify(vcpu):
            await trio.lowlevel.checkpoint()

        vq = GuestVirtqueue.create(guest.ram, alloc, 0, 8, notify, indirect=indirect, dma=dma)
        await vq.map_rings()
        ring_refs = dma.live_refs(coherent=True)
        assert ring_refs == 2 == grants_active(hv)  # descriptors + avail, then the used ring page
        dm = DmQueue(hv, 8, vq.desc_dma, vq.avail_dma, vq.used_dma)

        header = alloc.allocate(16)
        guest.ram.write(header, pattern(1, 16))
        data = alloc.allocate(2 * PAGE + 300)
        status = alloc.allocate(1)
        completion = await vq.submit([(header, 16)], [(data, 2 * PAGE + 300), (status, 1)])
        data_refs = grant_page_count(data % PAGE, 2 * PAGE + 300)
        assert grants_active(hv) == ring_refs + 1 + data_refs + 1 + (1 if indirect else 0)

        head, bufs = dm.pop()
        assert all(is_grant_address(a) for a in dm.addrs)
        assert [(n, f & sr.VIRTQ_DESC_F_WRITE) for _, n, f in bufs] == [
            (16, 0), (2 * PAGE + 300, sr.VIRTQ_DESC_F_WRITE), (1, sr.VIRTQ_DESC_F_WRITE)]
        out = DmView(hv, bufs[0][0], 16)
        assert out.read() == pattern(1, 16)
        out.close()
        for (addr, length, _), content in zip(bufs[1:], (pattern(9, 2 * PAGE + 300), b"\0")):
            view = DmView(hv, addr, length)
            view.write(0, content)
            view.close()
        dm.push_used(head, 2 * PAGE + 301)

        assert await vq.handle_used() == 1
        assert await completion == 2 * PAGE + 301
        assert guest.ram.read(data, 2 * PAGE + 300) == pattern(9, 2 * PAGE + 300)  # read by gpa
        assert grants_active(hv) == ring_refs  # every buffer's grant ended, the rings' stay
        assert all(entry[2] for entry in dma.live.values())
        dm.close()

        await vq.delete()
        assert grants_active(hv) == 0 and not dma.live
        for gpa in (header, data, status):
            alloc.free(gpa)
        assert alloc.allocation_count == 0
