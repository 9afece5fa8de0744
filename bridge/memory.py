"""Passthrough guest memory: the hypervisor's own RAM fds handed to the daemon.

Where guest RAM is a file (the simulator; a Xen-aware setup), the daemon can
map it directly: the bridge maps each bank once, so that it has a real
user address to put in the vhost-user region table (libvhost-user translates
ring addresses through it), and sends the fds with the memory table. The
daemon then reads and writes guest buffers itself; the bridge copies
nothing.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence

from vhost_user.frontend import MemoryRegionFd
from xen.hypervisor import GuestRamRegion, HypervisorError


class OutsideGuestRam(ValueError):
    """A guest-physical range that no RAM bank holds."""


class PassthroughMemory:
    def __init__(self, banks: Sequence[GuestRamRegion]) -> None:
        if not banks:
            raise HypervisorError("the hypervisor reported no guest RAM banks")
        self._maps: list[mmap.mmap] = []
        self.regions: list[MemoryRegionFd] = []
        try:
            for bank in sorted(banks, key=lambda b: b.gpa):
                mm = mmap.mmap(bank.fd, bank.size, flags=mmap.MAP_SHARED, offset=bank.fd_offset)
                self._maps.append(mm)
                self.regions.append(
                    MemoryRegionFd(
                        gpa=bank.gpa, size=bank.size, user_addr=_address_of(mm), fd=bank.fd, fd_offset=bank.fd_offset
                    )
                )
        except BaseException:
            self.close()
            raise

    def gpa_to_user(self, gpa: int, length: int) -> int:
        """The bridge-side user address of guest-physical [gpa, gpa+length)."""
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                return region.user_addr + (gpa - region.gpa)
        raise OutsideGuestRam(f"guest-physical {gpa:#x}+{length:#x} is outside guest RAM")

    def close(self) -> None:
        for mm in self._maps:
            mm.close()
        self._maps.clear()
        self.regions.clear()


def _address_of(mm: mmap.mmap) -> int:
    """Where ``mm`` is mapped in this process."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the map can be closed
