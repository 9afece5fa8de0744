"""DMA mapping for the simulated guest's virtio drivers.

A device never sees guest-physical addresses directly: the drivers hand it
*DMA addresses*, obtained from the DMA layer, as Linux's virtio drivers do
through the DMA API. Two layers are provided:

:class:`IdentityDma`
    The DMA address is the guest-physical address (a guest without an IOMMU,
    or Xen with ``grant_usage=0``). The drivers see ``needs_calls`` False
    and skip it altogether, so this mode costs nothing per request.

:class:`GrantDma`
    Linux's xen-grant-dma-ops (drivers/xen/grant-dma-ops.c), used when the
    device tree says ``grant_usage=1``: each mapping grants the buffer's
    frames to the backend domain with consecutive grant references
    (gnttab_alloc_grant_reference_seq) and the DMA address is
    ``(1 << 63) | (first_ref << 12) + offset_in_first_page``; unmapping
    ends access to each of those references. Coherent memory (the vring,
    from dma_alloc_coherent) is granted for as long as it lives.

The interface (:class:`GuestDma`) is the part of the DMA API the drivers need:

* ``await dma.map(gpa, length, device_writes=...)`` -> DMA address of a
  streaming buffer (dma_map_page; ``device_writes`` is DMA_FROM_DEVICE,
  otherwise DMA_TO_DEVICE), and ``await dma.unmap(dma_addr, length)``;
* ``await dma.map_coherent(gpa, length)`` -> DMA address of memory shared
  with the device for its whole life (the rings; dma_alloc_coherent's
  mapping half), and ``await dma.unmap_coherent(dma_addr, length)``;
* ``needs_calls``: False when every DMA address is the guest-physical
  address and no call is needed (the drivers then take their plain path).

Where the drivers use it: :class:`~xen.sim.virtio_mmio_driver.VirtioMmioDriver`
takes ``dma=`` and gives it to each virtqueue it sets up; the virtqueue maps
its rings once (QueueDesc/QueueDriver/QueueDevice get their DMA addresses)
and unmaps them when the queue is deleted at reset; it maps every buffer and
indirect table of a chain when the chain is added, and unmaps them when the
device returns the chain (before completing the request), or at reset.

Picking the mode from the device tree, as Linux's xen_virtio_restricted_mem_acc
decides from the "xen,grant-dma" property::

    async with SimGuest.open(control_path) as guest:
        device = (await guest.devices())[0]      # VirtioMmioDevice
        dma = dma_for_device(guest, device)       # GrantDma if device.grant_usage
        # or explicitly: dma = GrantDma(guest, backend_domid=device.backend_domid)
        transport = VirtioMmioDriver(None, guest.ram, allocator, device.base, device.irq, guest, dma=dma)
        blk = await VirtioBlkDriver.open(transport)
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from xen.sim.guest_memory import grant_page_count, grant_ref_of

logger = logging.getLogger(__name__)

__all__ = ["GuestDma", "IdentityDma", "GrantDma", "IDENTITY_DMA", "dma_for_device"]


class GuestDma(Protocol):
    """What the drivers need of a DMA layer (see the module docstring)."""

    needs_calls: bool

    async def map(self, gpa: int, length: int, *, device_writes: bool) -> int: ...

    async def unmap(self, dma_addr: int, length: int) -> None: ...

    async def map_coherent(self, gpa: int, length: int) -> int: ...

    async def unmap_coherent(self, dma_addr: int, length: int) -> None: ...


class IdentityDma:
    """DMA address == guest-physical address; nothing to set up or tear
    down. Its methods never suspend, and the drivers do not even call them
    (``needs_calls`` is False)."""

    needs_calls = False

    async def map(self, gpa: int, length: int, *, device_writes: bool) -> int:
        return gpa

    async def unmap(self, dma_addr: int, length: int) -> None:
        return None

    async def map_coherent(self, gpa: int, length: int) -> int:
        return gpa

    async def unmap_coherent(self, dma_addr: int, length: int) -> None:
        return None

    def __repr__(self) -> str:
        return "IdentityDma()"


IDENTITY_DMA = IdentityDma()
"""The default DMA layer of the drivers (stateless, so one is enough)."""


class GrantDma:
    """xen-grant-dma-ops over a guest's grant table.

    ``guest`` is anything with SimGuest's ``grant_dma_map(gpa, length, *,
    readonly, backend_domid)`` and ``grant_dma_unmap(addr, length)``.
    ``live`` maps the DMA address of every mapping not yet unmapped to
    ``(gpa, length, coherent)`` (for leak checks).

    Read-only grants: Linux grants a DMA_TO_DEVICE buffer read-only
    (xen_grant_dma_map_page: ``dir == DMA_TO_DEVICE``). The simulator
    refuses to map a read-only grant read-write (EPERM), and the bridge maps
    every grant read-write (vhost-user daemons get one writable view of
    memory), so with Linux's behaviour the device model could not map the
    request headers and write payloads at all. Hence by default every
    buffer is granted writable; ``readonly_grants=True`` gives Linux's
    behaviour for a device model that maps read-only grants read-only.
    Coherent memory is always granted writable, as in xen_grant_dma_alloc.

    Each map and unmap is shielded from cancellation: a grant request the
    simulator carried out but whose answer was dropped would leak a grant
    nobody can end (the reference never reached the caller).
    """

    needs_calls = True

    def __init__(self, guest: Any, backend_domid: int = 0, *, readonly_grants: bool = False) -> None:
        self.guest = guest
        self.backend_domid = backend_domid
        self.readonly_grants = readonly_grants
        self.live: dict[int, tuple[int, int, bool]] = {}
        self.maps = 0
        self.unmaps = 0

    async def _map(self, gpa: int, length: int, readonly: bool, coherent: bool) -> int:
        if length <= 0:
            raise ValueError(f"DMA map of {length} bytes at {gpa:#x}: the length must be positive")
        with trio.CancelScope(shield=True):
            addr = await self.guest.grant_dma_map(gpa, length, readonly=readonly, backend_domid=self.backend_domid)
        self.live[addr] = (gpa, length, coherent)
        self.maps += 1
        return addr

    async def _unmap(self, dma_addr: int, length: int, coherent: bool) -> None:
        entry = self.live.get(dma_addr)
        kind = "coherent" if coherent else "streaming"
        if entry is None:
            raise ValueError(f"DMA unmap of {dma_addr:#x}: not a live mapping (double unmap, or not ours)")
        if entry[1] != length or entry[2] != coherent:
            raise ValueError(
                f"DMA unmap of {dma_addr:#x}: mapped as {entry[1]} bytes "
                f"{'coherent' if entry[2] else 'streaming'}, unmapped as {length} bytes {kind}"
            )
        with trio.CancelScope(shield=True):
            # Forget the mapping first: if ending a grant fails half-way,
            # the references are in an unknown state and must not be
            # unmapped a second time.
            del self.live[dma_addr]
            self.unmaps += 1
            await self.guest.grant_dma_unmap(dma_addr, length)

    async def map(self, gpa: int, length: int, *, device_writes: bool) -> int:
        # Linux: readonly for DMA_TO_DEVICE. Not by default here: see the class docstring.
        readonly = self.readonly_grants and not device_writes
        return await self._map(gpa, length, readonly, False)

    async def unmap(self, dma_addr: int, length: int) -> None:
        await self._unmap(dma_addr, length, False)

    async def map_coherent(self, gpa: int, length: int) -> int:
        return await self._map(gpa, length, False, True)

    async def unmap_coherent(self, dma_addr: int, length: int) -> None:
        await self._unmap(dma_addr, length, True)

    # -- introspection, for tests and leak checks ---------------------------

    def refs_of(self, dma_addr: int) -> list[int]:
        """The grant references of the live mapping at ``dma_addr``."""
        _gpa, length, _coherent = self.live[dma_addr]
        ref, offset = grant_ref_of(dma_addr)
        return list(range(ref, ref + grant_page_count(offset, length)))

    def live_refs(self, *, coherent: bool | None = None) -> int:
        """How many grant references the live mappings hold (only the
        coherent or only the streaming ones with ``coherent``)."""
        total = 0
        for addr, (_gpa, length, is_coherent) in self.live.items():
            if coherent is None or coherent == is_coherent:
                total += grant_page_count(grant_ref_of(addr)[1], length)
        return total

    def __repr__(self) -> str:
        return f"GrantDma(backend_domid={self.backend_domid}, live={len(self.live)})"


def dma_for_device(guest: Any, device: Any) -> GuestDma:
    """The DMA layer a virtio device of the guest's device tree needs:
    :class:`GrantDma` to its backend domain when ``device.grant_usage`` is
    on (what libxl's "xen,grant-dma" device-tree property tells Linux),
    else the identity."""
    if getattr(device, "grant_usage", False):
        return GrantDma(guest, backend_domid=getattr(device, "backend_domid", 0))
    return IDENTITY_DMA
