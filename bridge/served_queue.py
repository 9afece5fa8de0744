"""A guest virtqueue the bridge serves itself: the device side of a split
ring (virtio 1.2 section 2.7), for queues that belong to no daemon, such as
virtio-net's control queue (bridge.net_control).

Sans I/O: guest memory comes in as an object with ``read`` and ``write``
(``bridge.memory.GuestRamMap`` or ``bridge.guest_pages.MappedGuestMemory``),
so grant addresses work where the memory object maps them.

The guest is not trusted. A chain is walked whole before anything is
written: every descriptor index inside its table, no descriptor visited
twice, at most the queue size of buffers, indirect tables only with
VIRTIO_F_INDIRECT_DESC (a non-zero multiple of 16 bytes, no INDIRECT inside
one, not together with NEXT), ``avail->idx`` never more than the queue size
ahead. A violation raises :class:`bridge.shadow_ring.RingError`: the caller
reports DEVICE_NEEDS_RESET. Device-readable bytes are read only up to
``max_readable`` per chain (the rest is reported as too long, not read).

Notifications: the bridge wants every kick, so it never sets
VIRTQ_USED_F_NO_NOTIFY, and with EVENT_IDX keeps ``avail_event`` at the next
entry it will consume. :meth:`ServedQueue.push` tells whether the guest wants
an interrupt (VIRTQ_AVAIL_F_NO_INTERRUPT, or ``used_event`` with EVENT_IDX).
"""

from __future__ import annotations

import attrs

from bridge import split_ring as sr
from bridge.memory import OutsideGuestRam
from bridge.shadow_ring import GuestRing, RingError

_NEXT = sr.VIRTQ_DESC_F_NEXT
_WRITE = sr.VIRTQ_DESC_F_WRITE
_INDIRECT = sr.VIRTQ_DESC_F_INDIRECT


@attrs.frozen
class Chain:
    """One request taken from the available ring."""

    head: int
    readable: bytes
    """The device-readable bytes in chain order (at most ``max_readable``)."""
    readable_len: int
    """How many device-readable bytes the chain has (may exceed ``len(readable)``)."""
    writable: tuple[tuple[int, int], ...]
    """(guest address, length) of each device-writable buffer, in chain order."""

    @property
    def truncated(self) -> bool:
        return self.readable_len > len(self.readable)


class ServedQueue:
    def __init__(self, ram, ring: GuestRing, *, event_idx: bool = False, indirect: bool = False,
                 max_readable: int = 1 << 16) -> None:
        if not sr.is_valid_queue_size(ring.num):
            raise ValueError(f"queue size {ring.num} is not a power of two <= {sr.MAX_QUEUE_SIZE}")
        self.ram = ram
        self.ring = ring
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_readable = max_readable
        self.last_avail = 0
        self.used_idx = 0

    def _read16(self, gpa: int, what: str) -> int:
        try:
            return sr.U16.unpack(self.ram.read(gpa, 2))[0]
        except OutsideGuestRam as exc:
            raise RingError(f"{what}: {exc}") from None

    def _write(self, gpa: int, data: bytes, what: str) -> None:
        try:
            self.ram.write(gpa, data)
        except OutsideGuestRam as exc:
            raise RingError(f"{what}: {exc}") from None

    def pop(self) -> Chain | None:
        """The next chain the guest made available, or None."""
        ring = self.ring
        avail_idx = self._read16(ring.avail + sr.AVAIL_IDX, "avail->idx")
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > ring.num:
            raise RingError(f"avail->idx {avail_idx} is {pending} entries ahead of {self.last_avail}, "
                            f"more than the queue size {ring.num}")
        if pending == 0:
            return None
        slot = self.last_avail & (ring.num - 1)
        head = self._read16(ring.avail + sr.avail_ring_entry(slot), f"avail->ring[{slot}]")
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            self._write(ring.used + sr.avail_event_offset(ring.num), sr.U16.pack(self.last_avail), "avail_event")
        return chain

    def _walk(self, head: int) -> Chain:
        ring = self.ring
        if head >= ring.num:
            raise RingError(f"avail entry names descriptor {head} of a queue of {ring.num}")
        table, table_len, index = ring.desc, ring.num, head
        seen: set[tuple[int, int]] = set()
        in_indirect = False
        readable = bytearray()
        readable_len = 0
        writable: list[tuple[int, int]] = []
        count = 0
        while True:
            if (table, index) in seen:
                raise RingError(f"descriptor chain from head {head} loops at descriptor {index}")
            seen.add((table, index))
            try:
                addr, length, flags, nxt = sr.DESC.unpack(self.ram.read(table + sr.DESC_SIZE * index, sr.DESC_SIZE))
            except OutsideGuestRam as exc:
                raise RingError(f"descriptor {index} of chain {head}: {exc}") from None
            if flags & _INDIRECT:
                if in_indirect:
                    raise RingError(f"chain {head}: an INDIRECT descriptor inside an indirect table")
                if not self.indirect:
                    raise RingError(f"chain {head}: INDIRECT without VIRTIO_F_INDIRECT_DESC")
                if flags & _NEXT:
                    raise RingError(f"chain {head}: INDIRECT together with NEXT")
                if length == 0 or length % sr.DESC_SIZE:
                    raise RingError(f"chain {head}: indirect table of {length} bytes")
                table, table_len, index, in_indirect = addr, length // sr.DESC_SIZE, 0, True
                continue
            count += 1
            if count > ring.num:
                raise RingError(f"chain {head} has more than {ring.num} buffers")
            if flags & _WRITE:
                writable.append((addr, length))
            else:
                if writable:
                    raise RingError(f"chain {head}: a device-readable buffer after a device-writable one")
                readable_len += length
                room = self.max_readable - len(readable)
                if room > 0 and length:
                    try:
                        readable += self.ram.read(addr, min(length, room))
                    except OutsideGuestRam as exc:
                        raise RingError(f"chain {head}: {exc}") from None
            if not flags & _NEXT:
                break
            if nxt >= table_len:
                raise RingError(f"chain {head}: next {nxt} is outside its table of {table_len}")
            index = nxt
        return Chain(head, bytes(readable), readable_len, tuple(writable))

    def push(self, chain: Chain, data: bytes) -> bool:
        """Write ``data`` into the chain's device-writable buffers, return
        the chain in the used ring; True if the guest wants an interrupt."""
        ring = self.ring
        room = sum(length for _addr, length in chain.writable)
        if len(data) > room:
            raise RingError(f"chain {chain.head} has {room} device-writable bytes, the reply needs {len(data)}")
        offset = 0
        for addr, length in chain.writable:
            if offset >= len(data):
                break
            piece = data[offset:offset + length]
            self._write(addr, piece, f"chain {chain.head}'s writable buffer")
            offset += len(piece)
        old = self.used_idx
        slot = old & (ring.num - 1)
        self._write(ring.used + sr.used_ring_entry(slot), sr.USED_ELEM.pack(chain.head, len(data)), "used ring")
        self.used_idx = (old + 1) & 0xFFFF
        self._write(ring.used + sr.USED_IDX, sr.U16.pack(self.used_idx), "used->idx")
        if self.event_idx:
            used_event = self._read16(ring.avail + sr.used_event_offset(ring.num), "used_event")
            return sr.vring_need_event(used_event, self.used_idx, old)
        flags = self._read16(ring.avail + sr.AVAIL_FLAGS, "avail->flags")
        return not flags & sr.VIRTQ_AVAIL_F_NO_INTERRUPT
