"""Shadow split virtqueues: the guest's ring served through a memfd arena, sans I/O.

On Xen the daemon cannot map guest RAM (docs/xen-ioreq.md, "Guest memory on
Xen"). The bridge therefore stands between two split rings (virtio 1.2
section 2.7) for each virtqueue, and plays a different role on each:

* **Device of the guest ring.** The guest's driver owns the descriptor
  table and the available ring in guest RAM; the bridge only reads them. It
  writes the guest's used ring: used elements, then ``used->idx``, and
  ``avail_event`` when VIRTIO_F_EVENT_IDX is negotiated. It decides on used
  buffer notifications (guest interrupts) from the guest's ``avail->flags``
  (VIRTQ_AVAIL_F_NO_INTERRUPT) or, with EVENT_IDX, ``used_event`` (2.7.7).
* **Driver of the shadow ring.** The shadow ring lives in the arena
  (:mod:`bridge.arena`), which is the daemon's whole memory table. The
  bridge writes its descriptor table and available ring: descriptors, then
  the ring entry, then ``avail->idx``, and ``used_event`` with EVENT_IDX. It
  reads the shadow used ring, which the daemon writes, and decides on
  available buffer notifications (daemon kicks) from the daemon's
  ``used->flags`` (VIRTQ_USED_F_NO_NOTIFY) or ``avail_event`` (2.7.10).

One guest chain becomes one shadow chain::

    guest avail[i] = head --> descriptor table / indirect table in guest RAM
        | walk and validate the whole chain; copy its device-readable bytes
        v into one arena buffer, each guest buffer at its place, back to back
    shadow avail[j] = shadow head --> direct chain in the arena: one shadow
        | descriptor per guest buffer, same order, same WRITE flags
        | the daemon serves it and puts (shadow head, len) in the shadow used ring
        v
    copy the first len device-writable bytes back to the guest buffers, in
    chain order; guest used[k] = (guest head, len); free the arena buffer
    and the shadow descriptors

The daemon is not trusted. The bridge never reads back what it wrote to the
arena: the guest address, length and flags behind every shadow descriptor
in flight are kept on the bridge's side. From the arena it takes only the
shadow used ring (checked whole before anything is applied:
:class:`DaemonRingError`), the daemon's notification hints, and device-
writable bytes, which go only into buffers the guest marked device-
writable, never more than the used length. Every byte in the arena came
from the guest through this queue's device or from the daemon, so stale
bytes left in a reused buffer tell the daemon nothing it has not seen.

Validation (:class:`RingError`: the guest broke the ring; the caller sets
DEVICE_NEEDS_RESET and sends a configuration change notification):

* each buffer descriptor and indirect table lies in guest RAM
  (``GuestMemory.check_range``, so device-writable buffers are checked when
  the chain is made available, not when the answer comes back) and does not
  wrap past 2^64; zero-length buffers are carried through unchecked;
* a chain has at most ``max_chain`` buffer descriptors (default: the queue
  size, 2.7.5.3.1 "MUST NOT create a descriptor chain longer than the Queue
  Size", indirect entries included) and at most 2^32 bytes (2.7.5.1);
* no descriptor is visited twice (a loop), ``next`` stays inside its table,
  an avail entry names a descriptor of the table, and ``avail->idx`` is
  never more than the queue size ahead of the entries consumed;
* indirect tables (2.7.5.3): only with VIRTIO_F_INDIRECT_DESC; the length
  is a non-zero multiple of 16; an INDIRECT inside a table and INDIRECT
  together with NEXT (both driver MUST NOTs) are refused rather than
  guessed at. Zero or more direct descriptors followed by one indirect
  descriptor are accepted, and WRITE on the indirect descriptor itself is
  ignored, as the device requirements say.

Device-readable and device-writable descriptors may come in any order; the
shadow chain keeps the guest's order. A chain is walked and validated in
full before anything is allocated or published, so a RingError leaves no
half-built chain; chains published before it stay in flight, and their
completions still reach the guest. After a RingError the queue is
:attr:`ShadowVirtqueue.broken` and publishes nothing more until reset.

Resources. A chain needs one arena buffer (its total length) and one free
shadow descriptor per buffer. When either is short, the chain and all
after it stay in the guest's available ring (``waiting``) and
``daemon_called`` publishes them, in order, once completions free enough.
A chain larger than the arena can ever hold is a RingError, not a wait that
could never end. A queue alone in its arena cannot deadlock: with nothing in
flight, every shadow descriptor is free and the arena holds any chain that
``Arena.fits_ever``. Queues sharing an arena are the caller's business:
after ``daemon_called`` on one, call ``guest_kicked`` on those ``waiting``.

Hooks. A queue may have a :class:`ChainHook`: a device type's layer that
sees each chain's request bytes in the arena before the daemon does (and
may rewrite them, answer the chain itself with :class:`Answered`, or keep
it waiting with :data:`WAIT`) and its response after the daemon returned
it. bridge.gpu_shadow is one: virtio-gpu commands name guest pages inside
the request. A chain the hook answers goes straight to the guest's used
ring; :meth:`ShadowVirtqueue.take_interrupt` says whether that needs an
interrupt.

Notifications. The bridge wants every guest kick and every daemon call. It
never sets VIRTQ_USED_F_NO_NOTIFY in the guest's used ring nor
VIRTQ_AVAIL_F_NO_INTERRUPT in the shadow available ring; with EVENT_IDX it
keeps the guest's ``avail_event`` at the next entry it will consume and the
shadow ``used_event`` at the next used entry it will read. After moving
either, it reads the index again and goes on if the index moved meanwhile:
an entry published in that window would otherwise get no notification.
``daemon_called`` may publish waiting chains: the caller then asks
:meth:`ShadowVirtqueue.kick_prepare` whether to kick the daemon.

Memory ordering. Guest RAM and the arena are shared with other CPUs. Every
point that needs a barrier calls ``barrier()``: a no-op by default, which
is enough for publishing where stores are not reordered with stores nor
loads with loads (x86). The two store-then-load points (the kick decision
after publishing avail->idx, the used index read again after used_event)
need store-load order too, which x86 does not promise and pure Python has
no portable way to ask for; hundreds of instructions separate the store
from the load, and a caller that has a real full barrier passes it.
Indices are 16 bits and wrap: all index arithmetic is mod 2^16, ring slots
are ``idx % num``.

Index stores. The daemon may read a shadow index at the very moment the
bridge stores it (DPDK's vhost PMD polls without pause), so avail->idx,
the avail ring entries and used_event are written through
:attr:`bridge.arena.Arena.u16`, one 16-bit store each. ``struct.pack_into``
zeroes its target before it writes the value: a daemon that read that 0
as avail->idx saw a whole lap of entries and took stale descriptors.

All per-chain state lives in arrays sized by the queue at construction; a
request allocates nothing on the bridge's side except the bytes objects
that ``GuestMemory.read`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import attrs

from bridge import split_ring as sr
from bridge.arena import Arena
from bridge.memory import OutsideGuestRam

logger = logging.getLogger(__name__)

MAX_CHAIN_BYTES = 1 << 32
"""Drivers MUST NOT add a descriptor chain longer than 2^32 bytes (2.7.5.1)."""

_ADDR_LIMIT = 1 << 64
_WRITE = sr.VIRTQ_DESC_F_WRITE
_NEXT = sr.VIRTQ_DESC_F_NEXT
_INDIRECT = sr.VIRTQ_DESC_F_INDIRECT


class GuestMemory(Protocol):
    """Guest RAM as the device sees it. Every method raises
    :class:`bridge.memory.OutsideGuestRam` for a range that is not entirely
    guest RAM (holes between banks included).

    ``write`` may be given a memoryview into the arena: it must copy the
    bytes during the call and keep no reference to ``data``."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def check_range(self, gpa: int, length: int) -> None:
        """Raise OutsideGuestRam unless [gpa, gpa + length) is guest RAM;
        touch nothing. Used to validate device-writable buffers when a
        chain is made available, long before anything is written to them."""
        ...


class RingError(Exception):
    """The guest broke the virtqueue. The caller sets DEVICE_NEEDS_RESET and
    raises a configuration change interrupt; :meth:`ShadowVirtqueue.reset`
    cleans up when the guest resets the device or the queue."""


class DaemonRingError(Exception):
    """The daemon broke the shadow ring (used id not in flight, completed
    twice, used len beyond the chain's device-writable bytes, used idx
    ahead of what was made available). Nothing was changed: neither the
    guest's rings nor the bridge's bookkeeping."""


@attrs.frozen
class GuestRing:
    """Guest-physical addresses of one split virtqueue, as the guest wrote
    them to QueueDesc/QueueDriver/QueueDevice, and its size (QueueNum)."""

    num: int
    desc: int
    avail: int
    used: int


class ChainBytes:
    """One chain's bytes in the arena, as the daemon sees them: the
    device-readable *request* (every device-readable buffer, in chain
    order, as one stream) and the device-writable *response* (likewise).
    Offsets are in the stream, whatever the buffers' boundaries; a
    :class:`ChainHook` reads and rewrites them through this.

    Before publication the request is read from ``request``, the bridge's
    own copy of what the guest gave (the daemon may scribble on the arena
    at any time), and writes go to both; after the daemon returned the
    chain there is no such copy and :meth:`read` takes the arena's bytes."""

    __slots__ = ("_buf", "_pieces", "_request", "request_size", "response_size")

    def __init__(self, buf: memoryview, pieces: list[tuple[int, int, int]],
                 request: bytearray | None = None) -> None:
        self._buf = buf
        self._pieces = pieces  # (arena offset, length, device-writable) in chain order
        self._request = request
        self.request_size = sum(n for _, n, w in pieces if not w)
        self.response_size = sum(n for _, n, w in pieces if w)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` request bytes from ``offset`` (ValueError past the end)."""
        if self._request is not None:
            if offset < 0 or length < 0 or offset + length > self.request_size:
                raise ValueError(f"{offset}+{length} is outside the chain's {self.request_size}-byte request")
            return bytes(self._request[offset:offset + length])
        out = bytearray()
        self._io(False, offset, length, out)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Rewrite request bytes at ``offset`` (ValueError past the end)."""
        self._io(False, offset, len(data), memoryview(data))
        if self._request is not None:
            self._request[offset:offset + len(data)] = data

    def read_response(self, length: int) -> bytes:
        """The first ``length`` response bytes (at most the response's size)."""
        out = bytearray()
        self._io(True, 0, min(length, self.response_size), out)
        return bytes(out)

    def write_response(self, data: bytes) -> int:
        """Write ``data`` at the start of the response, cut to its size;
        the bytes written."""
        n = min(len(data), self.response_size)
        self._io(True, 0, n, memoryview(data)[:n])
        return n

    def _io(self, writable: bool, offset: int, length: int, data) -> None:
        size = self.response_size if writable else self.request_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"{offset}+{length} is outside the chain's {size}-byte "
                             f"{'response' if writable else 'request'}")
        buf = self._buf
        at = 0  # stream offset of the current piece
        done = 0
        for pos, n, w in self._pieces:
            if bool(w) != writable or not n:
                continue
            if at + n > offset and done < length:
                start = max(offset - at, 0)
                take = min(n - start, length - done)
                if isinstance(data, bytearray):
                    data += buf[pos + start:pos + start + take]
                else:
                    buf[pos + start:pos + start + take] = data[done:done + take]
                done += take
            at += n


@attrs.frozen
class Answered:
    """What a :class:`ChainHook` returns to complete a chain itself: the
    response is written (:meth:`ChainBytes.write_response`) and the chain
    goes back to the guest with this used length, never to the daemon."""

    used_len: int


WAIT = object()
"""What a :class:`ChainHook` returns when the chain must stay in the
guest's ring until completions free arena space (it is offered again)."""


class ChainHook(Protocol):
    """A per-queue transformation of the chains that pass through (a device
    type's knowledge of its requests, e.g. bridge.gpu_shadow). Both calls
    happen with the chain's bytes in the arena: ``before_publish`` after the
    guest's request bytes were copied in and before the daemon can see
    them, ``after_return`` after the daemon returned the chain and before
    its response is copied to the guest."""

    def before_publish(self, chain: ChainBytes) -> object:
        """Inspect or rewrite the request. Returns :data:`WAIT`, an
        :class:`Answered`, or anything else: a cookie given back to
        ``after_return`` when the daemon returns the chain. Must change no
        state of its own when it returns WAIT (it is called again)."""
        ...

    def after_return(self, chain: ChainBytes, used_len: int, cookie: object) -> None: ...

    def reset(self) -> None:
        """Whatever the daemon held is gone (the queue was reset, the
        daemon lost): give back what was kept for it."""
        ...


def _no_barrier() -> None:
    return None


class ShadowVirtqueue:
    """One virtqueue: the guest's split ring (bridge = device) mirrored into a
    shadow split ring in ``arena`` (bridge = driver).

    ``arena_gpa`` is the guest-physical base the *daemon* sees for the arena
    in its memory table: shadow descriptors hold ``arena_gpa + offset``. The
    shadow ring parts are reserved in the arena here; their offsets are
    :attr:`shadow_desc_offset`, :attr:`shadow_avail_offset` and
    :attr:`shadow_used_offset` (for SET_VRING_ADDR). ``event_idx`` and
    ``indirect`` are the negotiated VIRTIO_F_EVENT_IDX and
    VIRTIO_F_INDIRECT_DESC; EVENT_IDX applies to both rings (the daemon gets
    the guest's features), INDIRECT only to the guest ring (shadow chains are
    always direct). ``max_chain`` caps the buffer descriptors of one chain
    (default and maximum: the queue size). ``barrier`` is the full memory
    barrier to use between publishing stores and the loads that must follow
    them (default: none; see the module's "Memory ordering").

    The guest's rings are not touched here; the shadow ring is zeroed.
    """

    def __init__(
        self,
        *,
        guest: GuestMemory,
        ring: GuestRing,
        arena: Arena,
        arena_gpa: int,
        event_idx: bool,
        indirect: bool,
        max_chain: int | None = None,
        barrier: Callable[[], None] | None = None,
        hook: ChainHook | None = None,
    ) -> None:
        num = ring.num
        if not sr.is_valid_queue_size(num):
            raise RingError(f"queue size {num} is not a power of two between 1 and {sr.MAX_QUEUE_SIZE}")
        for name, gpa, align in (("descriptor table", ring.desc, sr.DESC_ALIGN),
                                 ("available ring", ring.avail, sr.AVAIL_ALIGN),
                                 ("used ring", ring.used, sr.USED_ALIGN)):
            if gpa % align:
                raise RingError(f"{name} at {gpa:#x} is not {align}-byte aligned")
        for name, gpa, length in (("descriptor table", ring.desc, sr.desc_table_size(num)),
                                  ("available ring", ring.avail, sr.avail_ring_size(num)),
                                  ("used ring", ring.used, sr.used_ring_size(num))):
            try:
                guest.check_range(gpa, length)
            except OutsideGuestRam as exc:
                raise RingError(f"{name} is outside guest RAM ({gpa:#x} + {length:#x})") from exc
        if max_chain is None:
            max_chain = num
        if not 1 <= max_chain <= num:
            raise ValueError(f"max_chain must be between 1 and the queue size {num}, not {max_chain}")
        if arena_gpa < 0 or arena_gpa + arena.size > _ADDR_LIMIT:
            raise ValueError(f"arena at {arena_gpa:#x} + {arena.size:#x} does not fit in a 64-bit address space")

        self._guest = guest
        self.ring = ring
        self.num = num
        self._mask = num - 1
        self._arena = arena
        self._buf = arena.buf
        self._w16 = arena.u16  # index stores the daemon may race with: see Arena.u16
        self.arena_gpa = arena_gpa
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain = max_chain
        self._barrier = barrier if barrier is not None else _no_barrier
        self.hook = hook
        """The queue's :class:`ChainHook`, if its device type has one."""

        # Guest ring addresses of the fields touched on every pass.
        self._g_avail_idx = ring.avail + sr.AVAIL_IDX
        self._g_avail_flags = ring.avail + sr.AVAIL_FLAGS
        self._g_used_event = ring.avail + sr.used_event_offset(num)
        self._g_used_idx = ring.used + sr.USED_IDX
        self._g_avail_event = ring.used + sr.avail_event_offset(num)

        # The shadow ring, reserved at the start of the arena.
        reserved: list[int] = []
        try:
            for size, align in ((sr.desc_table_size(num), sr.DESC_ALIGN), (sr.avail_ring_size(num), sr.AVAIL_ALIGN),
                                (sr.used_ring_size(num), sr.USED_ALIGN)):
                reserved.append(arena.reserve(size, align))
        except BaseException:
            for offset in reserved:
                arena.unreserve(offset)
            raise
        self.shadow_desc_offset, self.shadow_avail_offset, self.shadow_used_offset = reserved
        # Word indices (byte offset / 2) of the shadow fields both sides touch.
        self._s_avail_idx = (self.shadow_avail_offset + sr.AVAIL_IDX) >> 1
        self._s_used_event = (self.shadow_avail_offset + sr.used_event_offset(num)) >> 1
        self._s_used_flags = (self.shadow_used_offset + sr.USED_FLAGS) >> 1
        self._s_used_idx = (self.shadow_used_offset + sr.USED_IDX) >> 1
        self._s_avail_event = (self.shadow_used_offset + sr.avail_event_offset(num)) >> 1
        self._s_avail_ring = (self.shadow_avail_offset + sr.avail_ring_entry(0)) >> 1

        # Per shadow descriptor: the guest buffer it stands for, and the link.
        self._d_gpa = [0] * num
        self._d_len = [0] * num
        self._d_write = [0] * num
        self._d_next = [0] * num
        # Per shadow head: the chain in flight.
        self._h_in_flight = [False] * num
        self._h_guest_head = [0] * num
        self._h_buf = [0] * num  # arena offset of the chain's bytes
        self._h_count = [0] * num  # shadow descriptors in the chain
        self._h_writable = [0] * num  # device-writable bytes of the chain
        self._h_seq = [0] * num  # publication order, for abandoned()/restart()
        self._h_cookie: list[object] = [None] * num  # the hook's, per chain
        # Scratch space: the chain being walked, the used batch being checked.
        self._w_gpa = [0] * max_chain
        self._w_len = [0] * max_chain
        self._w_write = [0] * max_chain
        self._u_id = [0] * num
        self._u_len = [0] * num
        self._u_mark = [0] * num
        self._u_stamp = 0
        self._visited: set[int] = set()
        self._elem = bytearray(sr.USED_ELEM.size)
        self._u16 = bytearray(2)

        self.closed = False
        self._init_state()

    def _init_state(self) -> None:
        # Shadow descriptors free as a stack, lowest index on top.
        self._free_desc = list(range(self.num - 1, -1, -1))
        for head in range(self.num):
            self._h_in_flight[head] = False
            self._h_cookie[head] = None
        self._in_flight = 0
        self._seq = 0
        # Guest ring (bridge = device).
        self._last_avail = 0  # next guest avail entry to consume
        self._avail_seen = 0  # guest avail->idx as last read
        self._used = 0  # guest used->idx as last published
        # Shadow ring (bridge = driver).
        self._shadow_avail = 0  # next shadow avail entry to fill
        self._shadow_avail_published = 0  # shadow avail->idx as written
        self._shadow_kicked = 0  # shadow avail->idx at the last kick decision
        self._shadow_last_used = 0  # next shadow used entry to read
        self._stopped = False
        self._broken: str | None = None
        self._answered_from: int | None = None  # guest used idx before chains the hook answered
        self._zero_shadow_rings()

    def _zero_shadow_rings(self) -> None:
        buf = self._buf
        for offset, size in ((self.shadow_desc_offset, sr.desc_table_size(self.num)),
                             (self.shadow_avail_offset, sr.avail_ring_size(self.num)),
                             (self.shadow_used_offset, sr.used_ring_size(self.num))):
            buf[offset:offset + size] = bytes(size)

    # -- state --------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Chains published to the daemon and not yet returned to the guest."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Guest avail entries seen but not yet published (no arena space or
        no free shadow descriptors, or the queue is stopped)."""
        return (self._avail_seen - self._last_avail) & 0xFFFF

    @property
    def last_avail_idx(self) -> int:
        """The guest avail index consumed up to (mod 2^16)."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """The guest used->idx the bridge has published (mod 2^16)."""
        return self._used

    @property
    def shadow_avail_idx(self) -> int:
        return self._shadow_avail

    @property
    def shadow_last_used_idx(self) -> int:
        return self._shadow_last_used

    @property
    def daemon_caught_up(self) -> bool:
        """Whether the daemon has completed every chain published to it
        (its used index in the shadow ring reached the published avail
        index), whether or not the bridge has returned them yet."""
        return self._w16[self._s_used_idx] == self._shadow_avail_published

    @property
    def free_descriptors(self) -> int:
        """Shadow descriptors not used by a chain in flight."""
        return len(self._free_desc)

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def broken(self) -> str | None:
        """Why the guest ring is broken (the message of the RingError raised),
        or None. A broken queue publishes nothing more; completions from the
        daemon are still returned to the guest. :meth:`reset` clears it."""
        return self._broken

    # -- guest -> daemon ----------------------------------------------------

    def guest_kicked(self) -> bool:
        """The guest notified the queue: publish every new guest chain to the
        shadow ring, as far as resources allow. Returns whether the daemon
        must be kicked. Raises :class:`RingError`."""
        self._check_open()
        if self._stopped or self._broken is not None:
            return False
        self._publish_available()
        return self.kick_prepare()

    def kick_prepare(self) -> bool:
        """Whether the shadow chains published since the last decision need a
        kick, per the daemon's VIRTQ_USED_F_NO_NOTIFY or ``avail_event``
        (Linux's virtqueue_kick_prepare). :meth:`guest_kicked` returns it;
        after :meth:`daemon_called` (which may publish waiting chains) and
        :meth:`restart`, the caller asks for it."""
        new = self._shadow_avail_published
        old = self._shadow_kicked
        self._shadow_kicked = new
        if new == old:
            return False
        self._barrier()  # the avail idx store before reading the daemon's hint
        if self.event_idx:
            avail_event = self._w16[self._s_avail_event]
            return sr.vring_need_event(avail_event, new, old)
        flags = self._w16[self._s_used_flags]
        return not flags & sr.VIRTQ_USED_F_NO_NOTIFY

    def _publish_available(self) -> None:
        """Walk guest avail entries from last_avail and publish them until the
        ring is drained or resources run out."""
        num = self.num
        try:
            self._drain_guest_avail(num)
        except RingError as exc:
            self._broken = str(exc)
            raise
        finally:
            self._flush_shadow_avail()

    def _drain_guest_avail(self, num: int) -> None:
        """Consume guest avail entries from last_avail until the ring is
        drained (and, with EVENT_IDX, stays drained after avail_event moved)
        or a chain has to wait for resources."""
        while True:
            avail_idx = self._read_guest16(self._g_avail_idx, "available ring idx")
            pending = (avail_idx - self._last_avail) & 0xFFFF
            if pending > num:
                raise RingError(f"avail idx jumped by {pending} with a {num}-entry queue "
                                f"(avail idx {avail_idx}, last consumed {self._last_avail})")
            self._avail_seen = avail_idx
            self._barrier()  # read avail->idx before the entries it exposes
            while self._last_avail != avail_idx:
                slot = self._last_avail & self._mask
                head = self._read_guest16(self.ring.avail + sr.avail_ring_entry(slot), "available ring entry")
                if head >= num:
                    raise RingError(f"avail ring slot {slot} (idx {self._last_avail}) names descriptor "
                                    f"{head}, outside the {num}-entry table")
                if not self._publish_chain(head):
                    self._set_avail_event()
                    return
                self._last_avail = (self._last_avail + 1) & 0xFFFF
            if not self.event_idx:
                return
            # Ask to be kicked for the next entry, then look again: the
            # guest may have published it before seeing avail_event.
            self._set_avail_event()
            self._barrier()
            if self._read_guest16(self._g_avail_idx, "available ring idx") == avail_idx:
                return

    def _set_avail_event(self) -> None:
        if self.event_idx:
            sr.U16.pack_into(self._u16, 0, self._last_avail)
            self._write_guest(self._g_avail_event, self._u16, "used ring avail_event")

    def _flush_shadow_avail(self) -> None:
        if self._shadow_avail_published != self._shadow_avail:
            self._barrier()  # descriptors and ring entries before the idx
            self._w16[self._s_avail_idx] = self._shadow_avail
            self._shadow_avail_published = self._shadow_avail

    def _publish_chain(self, guest_head: int) -> bool:
        """Walk, validate and publish one guest chain. False when it has to
        wait for arena space or shadow descriptors."""
        count, total, writable = self._walk(guest_head)
        arena = self._arena
        if not arena.fits_ever(total):
            raise RingError(f"chain at descriptor {guest_head} needs {total} bytes, more than the arena can "
                            f"ever hold ({arena.max_alloc} bytes)")
        if count > len(self._free_desc):
            logger.debug("shadow queue: chain at descriptor %d waits for %d shadow descriptors (%d free)",
                         guest_head, count, len(self._free_desc))
            return False
        base = arena.alloc(total)
        if base is None:
            logger.debug("shadow queue: chain at descriptor %d waits for %d bytes of arena (largest free %d)",
                         guest_head, total, arena.largest_free)
            return False
        buf = self._buf
        w_gpa, w_len, w_write = self._w_gpa, self._w_len, self._w_write
        # Device-readable bytes into the arena, every buffer at its place
        # (and, for a hook, kept here too: the daemon can write the arena
        # at any time, so the hook must not take the request from there).
        request = bytearray() if self.hook is not None else None
        pos = base
        try:
            for k in range(count):
                length = w_len[k]
                if length and not w_write[k]:
                    data = self._guest.read(w_gpa[k], length)
                    buf[pos:pos + length] = data
                    if request is not None:
                        request += data
                pos += length
        except BaseException as exc:
            arena.free(base)
            if isinstance(exc, OutsideGuestRam):
                raise RingError(f"chain at descriptor {guest_head}: buffer {w_gpa[k]:#x} + {w_len[k]:#x} "
                                f"is no longer in guest RAM") from exc
            raise
        cookie = None
        if self.hook is not None:
            try:
                cookie = self.hook.before_publish(self._walked_chain(base, count, request))
                if type(cookie) is Answered:
                    self._answer(guest_head, base, count, min(cookie.used_len, writable))
            except BaseException:
                arena.free(base)
                raise
            if cookie is WAIT or type(cookie) is Answered:
                arena.free(base)
                return cookie is not WAIT
        # One direct shadow chain, same order and WRITE flags.
        free = self._free_desc
        desc_offset = self.shadow_desc_offset
        addr = self.arena_gpa + base
        head = desc = free.pop()
        for k in range(count):
            length = w_len[k]
            write = w_write[k]
            self._d_gpa[desc] = w_gpa[k]
            self._d_len[desc] = length
            self._d_write[desc] = write
            if k + 1 < count:
                nxt = free.pop()
                sr.DESC.pack_into(buf, desc_offset + sr.DESC_SIZE * desc, addr, length, write | _NEXT, nxt)
            else:
                nxt = 0
                sr.DESC.pack_into(buf, desc_offset + sr.DESC_SIZE * desc, addr, length, write, 0)
            self._d_next[desc] = nxt
            addr += length
            desc = nxt
        self._h_in_flight[head] = True
        self._h_guest_head[head] = guest_head
        self._h_buf[head] = base
        self._h_count[head] = count
        self._h_writable[head] = writable
        self._h_seq[head] = self._seq
        self._h_cookie[head] = cookie
        self._seq += 1
        self._in_flight += 1
        self._w16[self._s_avail_ring + (self._shadow_avail & self._mask)] = head
        self._shadow_avail = (self._shadow_avail + 1) & 0xFFFF
        return True

    def _walked_chain(self, base: int, count: int, request: bytearray) -> ChainBytes:
        pieces = []
        pos = base
        for k in range(count):
            pieces.append((pos, self._w_len[k], self._w_write[k]))
            pos += self._w_len[k]
        return ChainBytes(self._buf, pieces, request)

    def _chain_in_flight(self, head: int) -> ChainBytes:
        pieces = []
        pos = self._h_buf[head]
        desc = head
        for _ in range(self._h_count[head]):
            pieces.append((pos, self._d_len[desc], self._d_write[desc]))
            pos += self._d_len[desc]
            desc = self._d_next[desc]
        return ChainBytes(self._buf, pieces)

    def _answer(self, guest_head: int, base: int, count: int, used_len: int) -> None:
        """The hook answered the walked chain: its response to the guest's
        buffers, the chain to the guest's used ring, without the daemon."""
        remaining = used_len
        pos = base
        try:
            for k in range(count):
                length = self._w_len[k]
                if self._w_write[k] and length and remaining:
                    n = min(length, remaining)
                    self._guest.write(self._w_gpa[k], self._buf[pos:pos + n])
                    remaining -= n
                pos += length
        except OutsideGuestRam as exc:
            raise RingError(f"device-writable buffer of the chain at descriptor {guest_head} is no longer in "
                            f"guest RAM") from exc
        if self._answered_from is None:
            self._answered_from = self._used
        sr.USED_ELEM.pack_into(self._elem, 0, guest_head, used_len)
        self._write_guest(self.ring.used + sr.used_ring_entry(self._used & self._mask), self._elem,
                          "used ring element")
        self._used = (self._used + 1) & 0xFFFF
        self._barrier()  # the used element before the idx
        sr.U16.pack_into(self._u16, 0, self._used)
        self._write_guest(self._g_used_idx, self._u16, "used ring idx")

    def take_interrupt(self) -> bool:
        """After :meth:`guest_kicked`: whether chains the hook answered
        itself need a guest interrupt (asked once)."""
        old = self._answered_from
        if old is None:
            return False
        self._answered_from = None
        return self._need_interrupt(old)

    def _walk(self, head: int) -> tuple[int, int, int]:
        """Follow the guest chain at ``head`` into the scratch arrays. Returns
        (buffer descriptors, total bytes, device-writable bytes). Raises
        RingError. Reads nothing but descriptor table entries (of the guest's
        table, or of an indirect table inside its descriptor's range)."""
        guest = self._guest
        visited = self._visited
        visited.clear()
        w_gpa, w_len, w_write = self._w_gpa, self._w_len, self._w_write
        max_chain = self.max_chain
        table = self.ring.desc
        table_size = self.num
        in_indirect = False
        where = "descriptor"  # how messages name an entry of the current table
        index = head
        count = 0
        total = 0
        writable = 0
        while True:
            if index in visited:
                raise RingError(f"{where} chain loops at {index} (chain head {head})")
            visited.add(index)
            try:
                addr, length, flags, nxt = sr.DESC.unpack(guest.read(table + sr.DESC_SIZE * index, sr.DESC_SIZE))
            except OutsideGuestRam as exc:
                raise RingError(f"{where} {index} cannot be read from guest RAM") from exc
            if flags & _INDIRECT:
                if in_indirect:
                    raise RingError(f"indirect table inside an indirect descriptor ({where} {index}, "
                                    f"chain head {head})")
                if not self.indirect:
                    raise RingError(f"descriptor {index} has VIRTQ_DESC_F_INDIRECT but VIRTIO_F_INDIRECT_DESC "
                                    f"was not negotiated")
                if flags & _NEXT:
                    raise RingError(f"descriptor {index} has both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT")
                if length == 0 or length % sr.DESC_SIZE:
                    raise RingError(f"descriptor {index}: indirect table length {length} is not a non-zero "
                                    f"multiple of {sr.DESC_SIZE}")
                if addr + length > _ADDR_LIMIT:
                    raise RingError(f"descriptor {index}: indirect table length overflows "
                                    f"({addr:#x} + {length:#x})")
                try:
                    guest.check_range(addr, length)
                except OutsideGuestRam as exc:
                    raise RingError(f"descriptor {index}: indirect table points outside guest RAM "
                                    f"({addr:#x} + {length:#x})") from exc
                in_indirect = True
                table = addr
                table_size = length // sr.DESC_SIZE
                where = f"indirect descriptor (table at {addr:#x})"
                visited.clear()
                index = 0
                continue
            if count == max_chain:
                limit = "the queue" if max_chain == self.num else f"the limit of {max_chain}"
                raise RingError(f"chain longer than {limit} ({count + 1} descriptors, chain head {head})")
            if addr + length > _ADDR_LIMIT:
                raise RingError(f"{where} {index} length overflows ({addr:#x} + {length:#x})")
            if length:
                try:
                    guest.check_range(addr, length)
                except OutsideGuestRam as exc:
                    raise RingError(f"{where} {index} points outside guest RAM ({addr:#x} + {length:#x})") from exc
            total += length
            if total > MAX_CHAIN_BYTES:
                raise RingError(f"chain length overflows: more than 2^32 bytes at {where} {index} "
                                f"(chain head {head})")
            write = flags & _WRITE
            w_gpa[count] = addr
            w_len[count] = length
            w_write[count] = write
            if write:
                writable += length
            count += 1
            if not flags & _NEXT:
                return count, total, writable
            if nxt >= table_size:
                raise RingError(f"{where} {index}: next {nxt} is outside the {table_size}-entry table")
            index = nxt

    # -- daemon -> guest ----------------------------------------------------

    def daemon_called(self) -> bool:
        """The daemon signalled the call eventfd: return every chain it put in
        the shadow used ring to the guest, then publish chains that were
        waiting for resources. Returns whether the guest must be
        interrupted. Afterwards, kick the daemon if :meth:`kick_prepare`
        says so (chains may have been published).

        Raises :class:`DaemonRingError` (nothing changed) if the daemon broke
        the shadow ring, :class:`RingError` if the guest did (a device-writable
        buffer no longer in guest RAM: the rest of the batch is still
        completed first)."""
        self._check_open()
        old_used = self._used
        try:
            self._collect_used()
            if self.waiting and not self._stopped and self._broken is None:
                self._publish_available()
            self._answered_from = None  # the decision below covers chains the hook answered
            return self._need_interrupt(old_used)
        except RingError as exc:
            if self._broken is None:
                self._broken = str(exc)
            raise

    def _collect_used(self) -> None:
        guest_error: RingError | None = None
        while True:
            used_idx = self._w16[self._s_used_idx]
            pending = (used_idx - self._shadow_last_used) & 0xFFFF
            if pending:
                self._barrier()  # read used->idx before the elements it exposes
                self._check_used_batch(used_idx, pending)
                error = self._complete_batch(pending)
                guest_error = guest_error or error
                self._shadow_last_used = used_idx
                self._barrier()  # guest used elements before the idx
                sr.U16.pack_into(self._u16, 0, self._used)
                self._write_guest(self._g_used_idx, self._u16, "used ring idx")
            if not self.event_idx:
                break
            # Ask to be called for the next used entry, then look again: the
            # daemon may have added one before it saw used_event.
            self._w16[self._s_used_event] = self._shadow_last_used
            self._barrier()
            if self._w16[self._s_used_idx] == self._shadow_last_used:
                break
        if guest_error is not None:
            raise guest_error

    def _check_used_batch(self, used_idx: int, pending: int) -> None:
        """Read and check ``pending`` used elements into the scratch arrays,
        changing nothing. The elements are read once: what is applied is
        what was checked, whatever the daemon writes meanwhile."""
        if pending > self._in_flight:
            raise DaemonRingError(f"shadow used idx moved by {pending} (to {used_idx}) with only "
                                  f"{self._in_flight} chains in flight")
        self._u_stamp += 1
        stamp = self._u_stamp
        mark, u_id, u_len = self._u_mark, self._u_id, self._u_len
        buf = self._buf
        first = self._shadow_last_used
        for j in range(pending):
            slot = (first + j) & self._mask
            head, used_len = sr.USED_ELEM.unpack_from(buf, self.shadow_used_offset + sr.used_ring_entry(slot))
            if head >= self.num or not self._h_in_flight[head]:
                raise DaemonRingError(f"shadow used slot {slot}: id {head} is not the head of a chain in flight")
            if mark[head] == stamp:
                raise DaemonRingError(f"shadow used slot {slot}: id {head} completed twice")
            if used_len > self._h_writable[head]:
                raise DaemonRingError(f"shadow used slot {slot}: id {head} used len {used_len} exceeds the "
                                      f"{self._h_writable[head]} device-writable bytes of the chain")
            mark[head] = stamp
            u_id[j] = head
            u_len[j] = used_len

    def _complete_batch(self, pending: int) -> RingError | None:
        """Apply a checked batch: copy back, write guest used elements, free.
        Returns the first guest error met (its chain is freed but not put in
        the guest's used ring)."""
        first_error: RingError | None = None
        for j in range(pending):
            head = self._u_id[j]
            used_len = self._u_len[j]
            try:
                if self.hook is not None:
                    cookie, self._h_cookie[head] = self._h_cookie[head], None
                    self.hook.after_return(self._chain_in_flight(head), used_len, cookie)
                try:
                    self._copy_back(head, used_len)
                except OutsideGuestRam as exc:
                    raise RingError(f"device-writable buffer of the chain at descriptor "
                                    f"{self._h_guest_head[head]} is no longer in guest RAM") from exc
                sr.USED_ELEM.pack_into(self._elem, 0, self._h_guest_head[head], used_len)
                self._write_guest(self.ring.used + sr.used_ring_entry(self._used & self._mask), self._elem,
                                  "used ring element")
                self._used = (self._used + 1) & 0xFFFF
            except RingError as exc:
                first_error = first_error or exc
            finally:
                self._release_chain(head)
        return first_error

    def _copy_back(self, head: int, used_len: int) -> None:
        """The first ``used_len`` device-writable bytes of the chain, from the
        arena to the guest buffers, in chain order."""
        buf = self._buf
        guest = self._guest
        remaining = used_len
        pos = self._h_buf[head]
        desc = head
        for _ in range(self._h_count[head]):
            if not remaining:
                return
            length = self._d_len[desc]
            if self._d_write[desc] and length:
                n = length if length < remaining else remaining
                guest.write(self._d_gpa[desc], buf[pos:pos + n])
                remaining -= n
            pos += length
            desc = self._d_next[desc]

    def _release_chain(self, head: int) -> None:
        self._h_in_flight[head] = False
        self._arena.free(self._h_buf[head])
        free = self._free_desc
        desc = head
        for _ in range(self._h_count[head]):
            free.append(desc)
            desc = self._d_next[desc]
        self._in_flight -= 1

    def _need_interrupt(self, old: int) -> bool:
        new = self._used
        if new == old:
            return False
        self._barrier()  # used->idx store before reading the guest's hint
        if self.event_idx:
            used_event = self._read_guest16(self._g_used_event, "available ring used_event")
            return sr.vring_need_event(used_event, new, old)
        flags = self._read_guest16(self._g_avail_flags, "available ring flags")
        return not flags & sr.VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- stop, restart, reset -----------------------------------------------

    def stop(self) -> int:
        """The daemon stopped the ring (GET_VRING_BASE): publish nothing more.
        Completions still come in through :meth:`daemon_called` (do a final
        one after the daemon stopped); the chains left in flight are
        :meth:`abandoned`. Returns the guest avail index consumed up to:
        chains not yet published stay in the guest's ring."""
        self._check_open()
        self._stopped = True
        return self._last_avail

    def abandoned(self) -> list[int]:
        """Guest head ids of the chains still in flight, oldest first."""
        heads = [h for h in range(self.num) if self._h_in_flight[h]]
        heads.sort(key=self._h_seq.__getitem__)
        return [self._h_guest_head[h] for h in heads]

    def restart(self) -> None:
        """After :meth:`stop`, start the shadow ring afresh for a (new) daemon:
        zero it, reset its indices to 0 (send SET_VRING_BASE 0) and publish
        the chains still in flight again, oldest first, with the bytes
        already in the arena. Call it before giving the ring to the daemon;
        then kick if :meth:`kick_prepare` says so, and call
        :meth:`guest_kicked` for guest chains that came meanwhile."""
        self._check_open()
        if not self._stopped:
            raise RuntimeError("restart() needs a stop() first: the daemon must not be using the shadow ring")
        heads = [h for h in range(self.num) if self._h_in_flight[h]]
        heads.sort(key=self._h_seq.__getitem__)
        self._zero_shadow_rings()
        self._shadow_avail = 0
        self._shadow_avail_published = 0
        self._shadow_kicked = 0
        self._shadow_last_used = 0
        buf = self._buf
        for head in heads:
            addr = self.arena_gpa + self._h_buf[head]
            desc = head
            count = self._h_count[head]
            for k in range(count):
                length = self._d_len[desc]
                nxt = self._d_next[desc]
                flags = self._d_write[desc] | (_NEXT if k + 1 < count else 0)
                sr.DESC.pack_into(buf, self.shadow_desc_offset + sr.DESC_SIZE * desc, addr, length, flags,
                                  nxt if k + 1 < count else 0)
                addr += length
                desc = nxt
            self._w16[self._s_avail_ring + (self._shadow_avail & self._mask)] = head
            self._shadow_avail = (self._shadow_avail + 1) & 0xFFFF
        self._stopped = False
        self._flush_shadow_avail()

    def reset(self) -> None:
        """Forget everything (device or queue reset): free every arena buffer,
        zero the shadow ring, all indices back to 0. Neither ring may be in
        use (the daemon is stopped, the guest reset the queue)."""
        self._check_open()
        for head in range(self.num):
            if self._h_in_flight[head]:
                self._arena.free(self._h_buf[head])
        self._init_state()
        if self.hook is not None:
            self.hook.reset()

    def close(self) -> None:
        """Reset and give the shadow ring's space back to the arena."""
        if self.closed:
            return
        self.reset()
        for offset in (self.shadow_desc_offset, self.shadow_avail_offset, self.shadow_used_offset):
            self._arena.unreserve(offset)
        self.closed = True

    # -- helpers ------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("shadow virtqueue is closed")

    def _read_guest16(self, gpa: int, what: str) -> int:
        try:
            return sr.U16.unpack(self._guest.read(gpa, 2))[0]
        except OutsideGuestRam as exc:
            raise RingError(f"{what} at {gpa:#x} is outside guest RAM") from exc

    def _write_guest(self, gpa: int, data: bytearray, what: str) -> None:
        try:
            self._guest.write(gpa, data)
        except OutsideGuestRam as exc:
            raise RingError(f"{what} at {gpa:#x} is outside guest RAM") from exc

    def __repr__(self) -> str:
        return (f"<ShadowVirtqueue num={self.num} last_avail={self._last_avail} used={self._used} "
                f"in_flight={self._in_flight} waiting={self.waiting} shadow_avail={self._shadow_avail} "
                f"shadow_last_used={self._shadow_last_used}{' stopped' if self._stopped else ''}>")
