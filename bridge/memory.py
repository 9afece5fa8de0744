"""Guest memory models: what the daemon's memory table holds.

- passthrough: the hypervisor's own guest-RAM fds go to the daemon, which
  then reads and writes guest buffers itself; the bridge copies nothing.
  Needs guest RAM that is a file (the simulator; a Xen-aware set-up).
- shadow: the daemon's memory table is one memfd arena and nothing else; the
  bridge walks the guest's rings, copies in-flight buffers in and out
  (bridge.shadow_ring), and the daemon sees no guest page at all. This is
  what lets an unmodified daemon serve a guest whose RAM is not a file, and
  bounds what a daemon can see to the buffers in flight.

Passthrough uses :class:`GuestRamMap`, the bridge's own mapping of every
RAM bank, for the user addresses of the region table. Shadow reads and
writes guest rings and buffers through any object with ``read``, ``write``
and ``check_range`` of the same contract: on Xen (and by default in the
simulator) that is :class:`bridge.guest_pages.MappedGuestMemory`, which maps
only the pages it touches. Guest memory is shared by every device of a
bridge, so its owner (``bridge.app``) closes it, not the memory models.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from collections.abc import Sequence

from bridge.arena import Arena
from vhost_user.frontend import MemoryRegionFd
from xen.hypervisor import GuestRamRegion, HypervisorError

MODES = ("auto", "passthrough", "shadow")

# Where the daemon sees the arena in shadow mode. Any address works (it only
# has to match the shadow descriptors); 0 makes arena offsets readable in a
# daemon's logs.
ARENA_GPA = 0


class OutsideGuestRam(ValueError):
    """A guest-physical range that no RAM bank holds."""


class GuestRamMap:
    """The bridge's own mapping of every guest RAM bank."""

    def __init__(self, banks: Sequence[GuestRamRegion]) -> None:
        if not banks:
            raise HypervisorError("the hypervisor reported no guest RAM banks")
        self.banks = sorted(banks, key=lambda b: b.gpa)
        self._starts = [b.gpa for b in self.banks]
        self._maps: list[mmap.mmap] = []
        self.user_addrs: list[int] = []
        try:
            for bank in self.banks:
                mm = mmap.mmap(bank.fd, bank.size, flags=mmap.MAP_SHARED, offset=bank.fd_offset)
                self._maps.append(mm)
                self.user_addrs.append(address_of(mm))
        except BaseException:
            self.close()
            raise

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        """(bank index, offset in the bank) of [gpa, gpa + length)."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            bank = self.banks[i]
            offset = gpa - bank.gpa
            if offset + length <= bank.size:
                return i, offset
        raise OutsideGuestRam(f"guest-physical {gpa:#x}+{length:#x} is outside guest RAM")

    def check_range(self, gpa: int, length: int) -> None:
        self._locate(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        i, offset = self._locate(gpa, length)
        return self._maps[i][offset : offset + length]

    def write(self, gpa: int, data) -> None:
        length = len(data)
        i, offset = self._locate(gpa, length)
        self._maps[i][offset : offset + length] = data

    def gpa_to_user(self, gpa: int, length: int) -> int:
        """The bridge-side user address of guest-physical [gpa, gpa+length)."""
        i, offset = self._locate(gpa, length)
        return self.user_addrs[i] + offset

    def close(self) -> None:
        for mm in self._maps:
            mm.close()
        self._maps.clear()
        self.user_addrs.clear()


class PassthroughMemory:
    """Guest RAM handed to the daemon as the hypervisor's own fds."""

    mode = "passthrough"

    def __init__(self, ram: GuestRamMap) -> None:
        self.ram = ram
        self.regions = [
            MemoryRegionFd(gpa=b.gpa, size=b.size, user_addr=addr, fd=b.fd, fd_offset=b.fd_offset)
            for b, addr in zip(ram.banks, ram.user_addrs)
        ]

    def close(self) -> None:
        pass  # the guest RAM map is shared; its owner closes it


class ShadowMemory:
    """One memfd arena is the daemon's whole memory table."""

    mode = "shadow"

    def __init__(self, ram, arena_size: int) -> None:
        self.ram = ram
        self.arena = Arena(arena_size)
        self.arena_user_addr = address_of(self.arena.buf)
        self.regions = [
            MemoryRegionFd(
                gpa=ARENA_GPA, size=self.arena.size, user_addr=self.arena_user_addr, fd=self.arena.fd, fd_offset=0
            )
        ]

    def close(self) -> None:
        self.arena.close()


def address_of(buffer) -> int:
    """Where a writable buffer (an mmap, a memoryview of one) starts in this
    process."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the map can be closed
