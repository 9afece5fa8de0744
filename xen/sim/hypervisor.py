"""xen-sim: a simulated Xen hypervisor for one guest domain.

A separate process that the bridge talks to exactly as it would talk to Xen
through privcmd and /dev/xen/evtchn, only over a UNIX control socket (see
``xen.sim.control`` for every wire format). It owns:

- guest RAM: one sparse memfd, laid out like Xen on Arm's RAM banks (bank 0
  at 0x40000000, 3 GiB; a bigger guest gets bank 1 at 0x200000000);
- ioreq servers, after ``xen/common/ioreq.c``: ids 0..7 (ENOSPC beyond),
  each with its ioreq page (``struct ioreq vcpu_ioreq[]``) in a memfd the
  device model maps through map_resource (frame 1; frame 0 is the buffered
  page of an x86 server), one guest-side event channel per vCPU written into
  ``vp_eport`` at enable - if the page has been acquired by then, as in Xen -
  and a rangeset per range type (end inclusive; an overlap within a server
  is EEXIST, unmapping what is not mapped ENOENT, another device model's
  server EPERM);
- event channels: guest-side ports (from 3: 1 and 2 are the toolstack's
  xenstore and console channels), dom0 local ports (from 64), and
  per-client event-channel devices that behave like Linux's evtchn driver:
  a delivered port stays masked until unmasked, events that fire while it is
  masked are remembered and delivered at unmask, and bind_interdomain sets
  the new local port pending at once (Xen's fix-up for notifications lost
  on the unbound port);
- the vGIC as far as ``XEN_DMOP_set_irq_level`` reaches it: SPIs only
  (EINVAL otherwise), level 0 or 1;
- the vCPU trap path, try_fwd_ioserv() and ioreq_send(): the access goes to
  the highest-numbered enabled server whose rangeset holds all of it (none:
  a data abort); the slot must be NONE and hold Xen's vp_eport (else a data
  abort, as Xen logs "device model set bad IO state/event channel"); every
  field is written with state NONE, then ``state = IOREQ_READY``; the port
  fires; the vCPU then follows hvm_wait_for_io() at each notification:
  IORESP_READY completes (reads masked to the access size) and resets the
  slot to NONE, INPROCESS keeps waiting, NONE completes with all-ones, a
  state going backwards or out of range crashes the domain.

Where the simulator departs from Xen, on purpose:

- a watchdog answers a vCPU that waited ``--vcpu-timeout`` seconds with
  "vcpu hung" and names the likely cause (Xen would block it forever); the
  slot stays the device model's, and the vCPU stays "still blocked" for
  later accesses until the device model completes it;
- a device model whose control connection closes has its ioreq servers
  destroyed, and a vCPU waiting on one gets "device model gone" (Xen keeps
  the servers; the vCPU would hang);
- ``--strict-ranges`` refuses MMIO ranges that overlap another server's
  (Xen accepts them; by default the simulator does too and logs a warning);
- ``--irq-model line`` latches an edge only on a 0 -> 1 change of the line
  (Xen's vGIC latches one at every level-1 call: the default "xen" model).

The toolstack's side (:class:`Toolstack`): a xenstore
(``xen.sim.xenstore``, xenstored's semantics) that device models reach
through the ``xs_*`` ops, each handle with a socketpair for its watch
events; every device model is dom0, so it may read, write and remove
anything, which is how a test plays ``xl`` (removing a backend directory
is a device unplug). At start-up the tree holds what xen-init-dom0 and
libxl write: dom0's and the guest's domid and name, the guest's memory
(KiB, from ``--ram-mib``) and, for each repeatable ``--virtio SPEC``
(xl.cfg syntax, ``type=virtio,device<hex>[,grant_usage=0|1][,backend=N]``,
or ``blk``/``gpu``/``fs``/``net``), libxl's backend and frontend keys of
a virtio-mmio device at 0x2000000 + 0x200 * devid, SPI 33 + devid. The
guest reads its device tree with the guest-role op ``devices``; with
``vcpu_loop`` its vCPUs run a load loop here, in the simulator, as Xen
runs a vCPU (``xen.sim.vcpu_loop``: the benchmark's round trips). Guest
memory through the Hypervisor interface: ``map_foreign`` (privcmd foreign
mapping: every frame must be RAM of one bank, else EINVAL naming the first
bad gfn) and ``map_grant_refs`` (gntdev: active grants to dom0 only) reply
with the RAM memfd and offsets, and ``stats`` counts what was mapped. The
guest's grant table takes ``grant_access``, ``grant_access_seq`` (count
consecutive refs for consecutive frames, as Linux's xen-grant-dma) and
``end_access`` from the guest: refs from 8 (0-7 are reserved), lowest free
first. Departures: a read-only grant is refused (EPERM) rather than mapped
read-only, since device models map read-write; the simulator does not
know what a device model still has mapped, so end_access always succeeds
where Xen would keep an entry in use while it is mapped; grants and the
tree outlive a guest's detach, as the domain does.

The dom0 kernel's fast path (:class:`PrivcmdEventfds`, Linux >= 6.7's
privcmd; ``--no-kernel-fast-path`` models an older kernel: both ops fail
with ENOTTY). ``privcmd_ioeventfd`` hangs a handler on the local port of
each vCPU of an ioreq server. The interrupt that delivers such a port to
the evtchn device runs it too (a shared IRQ): userspace still sees the
port, and must still unmask it, since the channel stays masked until then
(Linux's late EOI) and a masked port runs neither handler. The handler
takes a slot that is IOREQ_READY, COPY and a write, sets it INPROCESS,
holds it ``--fast-path-hold-us`` (default 0: decides at once; tests ask for
a hold to open the race window below), then either
signals the eventfd of the first registration whose base + 0x50, addr_len
and vq (the low 16 bits of the data) match, sets IORESP_READY and notifies
(the vCPU completes as if the device model had completed the slot), or
puts the slot back to IOREQ_READY and notifies nobody: a device model that
skipped the slot because it saw it INPROCESS must look again, or the vCPU
hangs. Reads never match. An eventfd is known by its identity (its
fdinfo eventfd-id), not by the fd number that brought it; registering one
twice is EBUSY, deassigning one that is not there ENODEV, as in Linux.
``privcmd_irqfd`` watches an eventfd and turns each signal (its count read
and cleared) into set_irq_level(irq, 1), under ``--irq-model``.
Departures: the ioeventfd ports must be exactly those the device model
bound to the server's vp_eports on its own evtchn device, one per vCPU of
the domain (EINVAL; Linux hooks whatever ports it is given); a second
ioeventfd for the same base and vq is EEXIST (Linux accepts it and the
first one wins); an irqfd's irq must be an SPI at assign (EINVAL; Linux
issues the prepared dm_op blindly and logs its failure at each signal);
deassigning an unknown irqfd is ENOENT (Linux returns 0); registrations
go with their ioreq server and with the device model's connection, and
their eventfds are closed (Linux keeps them until deassigned).

Not simulated: IOREQ_TYPE_INVALIDATE broadcasts, PIO and PCI-config ioreqs
(Arm sends neither), delivery through the buffered page, ioreq pages for
more than 128 vCPUs, and legacy GFN mapping of the pages.

The hot path is one trio task (:class:`Poller`) around a private epoll set
of every vCPU trap socket and event-channel device; everything else
(control connections, timers, signals) is ordinary trio tasks.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import heapq
import logging
import mmap
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections import deque
from collections.abc import Callable

import trio

from xen import abi
from xen.sim import control
from xen.sim import xenstore as sim_xenstore
from xen.sim.vcpu_loop import MAX_MS as VCPU_LOOP_MAX_MS
from xen.sim.vcpu_loop import VcpuLoop
from xen.sim.control import (
    EVTCHN_OP_NOTIFY,
    EVTCHN_OP_UNMASK,
    EVTCHN_PORT,
    EVTCHN_RECORD,
    IRQ_LEVEL_REPLY,
    IRQ_LEVEL_REQUEST,
    IRQ_RECORD,
    TRAP_BAD_REQUEST,
    TRAP_DATA_ABORT,
    TRAP_DM_GONE,
    TRAP_DOMAIN_CRASHED,
    TRAP_OK,
    TRAP_READ,
    TRAP_REPLY,
    TRAP_REQUEST,
    TRAP_VCPU_HUNG,
    TRAP_WRITE,
    ProtocolError,
    error_reply,
    ok_reply,
)

log = logging.getLogger("xen.sim")

# --- constants of the platform being simulated --------------------------

MAX_NR_IOREQ_SERVERS = 8  # xen/include/xen/ioreq.h
MAX_NR_IO_RANGES = 256  # per rangeset (rangeset_limit)
NR_IO_RANGE_TYPES = 3  # XEN_DMOP_IO_RANGE_{PORT,MEMORY,PCI}
GUEST_MAX_VCPUS = 128  # arch-arm.h; also the slots of one ioreq page
NR_LOCAL_IRQS = 32  # SGIs + PPIs; SPIs start here
MAX_NR_SPIS = 1020 - NR_LOCAL_IRQS  # domain_vgic_init() refuses more
EVTCHN_2L_NR_CHANNELS = 4096  # 2-level event channel ABI, 64-bit guest
GUEST_RAM0_BASE = 0x40000000  # arch-arm.h
GUEST_RAM0_SIZE = 0xC0000000
GUEST_RAM1_BASE = 0x0200000000
GUEST_RAM1_SIZE = 0xFE00000000
DOMID_FIRST_RESERVED = 0x7FF0

# The guest's ports 1 and 2 are its xenstore and console channels, which the
# toolstack allocates when it builds the domain: ioreq servers get ports from 3.
GUEST_FIRST_FREE_PORT = 3
# Dom0's kernel and toolstack already hold its low ports on a real host; local
# ports handed to device models start here, which also keeps them visibly
# different from the guest-side numbers a device model must not confuse them with.
DOM0_FIRST_FREE_PORT = 64

STATE_NONE = abi.IoreqState.NONE.value
STATE_IOREQ_READY = abi.IoreqState.IOREQ_READY.value
STATE_INPROCESS = abi.IoreqState.INPROCESS.value
STATE_IORESP_READY = abi.IoreqState.IORESP_READY.value
STATE_NAMES = {s.value: s.name for s in abi.IoreqState}
TYPE_COPY = abi.IoreqType.COPY.value
OFF_FLAGS = abi.OFF_FLAGS
SIZE_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
U64_MAX = 0xFFFFFFFFFFFFFFFF
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
RANGE_TYPE_NAMES = {0: "port", 1: "memory", 2: "pci"}


class XenError(Exception):
    """A hypercall failure: an errno and a message naming what failed and why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


# --- small building blocks ----------------------------------------------


class Outbox:
    """Ordered, never-blocking sends on a SOCK_SEQPACKET socket: a message
    that does not fit now waits in a backlog that :meth:`run` flushes."""

    __slots__ = ("sock", "backlog", "closed", "_lot")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.backlog: deque[bytes] = deque()
        self.closed = False
        self._lot = trio.lowlevel.ParkingLot()

    def send(self, data) -> None:
        if self.closed:
            return
        if self.backlog:
            self.backlog.append(bytes(data))
            return
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.backlog.append(bytes(data))
            self._lot.unpark_all()
        except OSError as exc:
            self.closed = True
            log.debug("peer of fd %d is gone (%s)", self.sock.fileno(), exc)

    def close(self) -> None:
        self.closed = True
        self.backlog.clear()
        self._lot.unpark_all()

    async def run(self) -> None:
        try:
            await self._run()
        except trio.ClosedResourceError:
            pass  # the socket was closed under us

    async def _run(self) -> None:
        sock = self.sock
        backlog = self.backlog
        while not self.closed:
            if not backlog:
                await self._lot.park()
                continue
            await trio.lowlevel.wait_writable(sock)
            while backlog:
                try:
                    sock.send(backlog[0])
                except BlockingIOError:
                    break
                except OSError as exc:
                    self.closed = True
                    backlog.clear()
                    log.debug("peer of fd %d is gone (%s)", sock.fileno(), exc)
                    return
                backlog.popleft()


class Poller:
    """The hot path's single trio task.

    One private epoll set holds every vCPU trap socket and event-channel
    device; a readable socket's handler runs synchronously. While traffic
    flows the task keeps waiting in its own epoll (up to BUSY_WINDOW after
    the last event) instead of going back through trio's scheduler for every
    message: an access then costs two epoll waits in this process, not two
    trio scheduling rounds. It hands control back to trio as soon as any
    socket trio serves (control connections, the listener) is readable, and
    at least every YIELD_EVERY seconds, so control requests, timers and
    signals are never held up for long. Callbacks of :meth:`call_later` run
    in this task too, on time whether it is busy or idle."""

    BUSY_WINDOW = 0.002
    YIELD_EVERY = 0.005

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[], None] | None] = {}
        # call_later(): a heap of (time.monotonic() deadline, seq, callback),
        # and the cancel scope of the idle wait in trio, to wake it in time.
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._idle: trio.CancelScope | None = None

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` in this task, as a handler runs, once ``delay``
        seconds have passed (the kernel fast path's held ioreq slots)."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, callback))
        idle = self._idle
        if idle is not None:  # waiting in trio: wake up in time
            idle.deadline = min(idle.deadline, trio.current_time() + delay)

    def _run_timers(self) -> bool:
        """Run every callback that is due; True if any ran."""
        timers = self._timers
        ran = False
        while timers and timers[0][0] <= time.monotonic():
            callback = heapq.heappop(timers)[2]
            ran = True
            try:
                callback()
            except Exception:  # like a handler's: log it, keep serving
                log.exception("internal error in a timer callback")
        return ran

    def add(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        fd = sock.fileno()
        self._ep.register(fd, select.EPOLLIN)
        self._handlers[fd] = handler

    def watch(self, fd: int) -> None:
        """A socket trio serves: new data on it ends a busy spell. Edge
        triggered, so a message its task has not read yet cannot keep us
        bouncing in and out of trio."""
        self._ep.register(fd, select.EPOLLIN | select.EPOLLET)
        self._handlers[fd] = None

    def remove(self, sock_or_fd) -> None:
        """Forget a socket (added or watched); call before closing it."""
        fd = sock_or_fd if type(sock_or_fd) is int else sock_or_fd.fileno()
        if fd in self._handlers:
            del self._handlers[fd]
            self._ep.unregister(fd)

    async def run(self) -> None:
        ep = self._ep
        poll = ep.poll
        handlers = self._handlers
        epfd = ep.fileno()
        wait_readable = trio.lowlevel.wait_readable
        monotonic = time.monotonic
        window = self.BUSY_WINDOW
        yield_every = self.YIELD_EVERY
        timers = self._timers
        while True:
            idle = self._idle = trio.CancelScope()
            if timers:
                idle.deadline = trio.current_time() + max(timers[0][0] - monotonic(), 0.0)
            with idle:
                await wait_readable(epfd)
            self._idle = None
            last_yield = monotonic()
            busy_until = last_yield + window
            events = poll(0)
            while True:
                trio_needed = False
                for fd, _events in events:
                    handler = handlers.get(fd, False)
                    if handler is None:
                        trio_needed = True
                    elif handler is not False:
                        try:
                            handler()
                        except Exception:  # one broken channel must not stop the others
                            log.exception("internal error on fd %d; dropping it", fd)
                            self.remove(fd)
                if trio_needed:
                    break
                timed = timers and timers[0][0] <= monotonic() and self._run_timers()
                now = monotonic()
                if events or timed:
                    busy_until = now + window
                elif now >= busy_until:
                    break
                if now - last_yield >= yield_every:
                    await trio.lowlevel.checkpoint()
                    last_yield = now = monotonic()
                timeout = busy_until - now
                if timers and timers[0][0] - now < timeout:
                    timeout = timers[0][0] - now
                events = poll(max(timeout, 0.0))

    def close(self) -> None:
        self._ep.close()


class RangeSet:
    """Xen's rangeset: disjoint inclusive ranges kept sorted, adjacent ranges
    merged, at most ``limit`` of them."""

    __slots__ = ("starts", "ends", "limit")

    def __init__(self, limit: int = MAX_NR_IO_RANGES) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.limit = limit

    def __len__(self) -> int:
        return len(self.starts)

    def contains(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def overlapping(self, start: int, end: int) -> tuple[int, int] | None:
        """The first range that overlaps [start, end], if any."""
        i = bisect.bisect_right(self.starts, end) - 1
        if i >= 0 and self.ends[i] >= start:
            # ranges are disjoint and sorted: the one before might overlap too
            while i > 0 and self.ends[i - 1] >= start:
                i -= 1
            return self.starts[i], self.ends[i]
        return None

    def add(self, start: int, end: int) -> None:
        """Add a range that overlaps nothing (the caller checked)."""
        i = bisect.bisect_left(self.starts, start)
        merge_prev = i > 0 and self.ends[i - 1] + 1 == start
        merge_next = i < len(self.starts) and end + 1 == self.starts[i]
        if merge_prev and merge_next:
            self.ends[i - 1] = self.ends[i]
            del self.starts[i], self.ends[i]
        elif merge_prev:
            self.ends[i - 1] = end
        elif merge_next:
            self.starts[i] = start
        else:
            if len(self.starts) >= self.limit:
                raise XenError(errno.ENOMEM, f"the rangeset already holds {self.limit} ranges (MAX_NR_IO_RANGES)")
            self.starts.insert(i, start)
            self.ends.insert(i, end)

    def remove(self, start: int, end: int) -> None:
        """Remove [start, end], which one range contains (the caller checked)."""
        i = bisect.bisect_right(self.starts, start) - 1
        r_start, r_end = self.starts[i], self.ends[i]
        if r_start < start and end < r_end:
            if len(self.starts) >= self.limit:
                raise XenError(errno.ENOMEM, f"splitting the range would exceed {self.limit} ranges (MAX_NR_IO_RANGES)")
            self.ends[i] = start - 1
            self.starts.insert(i + 1, end + 1)
            self.ends.insert(i + 1, r_end)
        elif r_start < start:
            self.ends[i] = start - 1
        elif end < r_end:
            self.starts[i] = end + 1
        else:
            del self.starts[i], self.ends[i]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))


# --- event channels -------------------------------------------------------


class GuestPort:
    """An event channel port in the guest's namespace, allocated unbound for
    dom0 (alloc_unbound_xen_event_channel) by an ioreq server."""

    __slots__ = ("port", "server", "vcpu", "bound")

    def __init__(self, port: int, server: "IoreqServer", vcpu: int | None) -> None:
        self.port = port
        self.server = server
        self.vcpu = vcpu  # None for the buffered-ioreq port
        self.bound: "Binding | None" = None


class Binding:
    """A dom0 local port bound on an event-channel device, with the Linux
    evtchn driver's per-port mask and Xen's pending bit."""

    __slots__ = ("port", "device", "remote", "masked", "pending", "port_bytes")

    def __init__(self, port: int, device: "EvtchnDevice", remote: GuestPort) -> None:
        self.port = port
        self.device = device
        self.remote: GuestPort | None = remote
        self.masked = False
        self.pending = False
        self.port_bytes = EVTCHN_PORT.pack(port)


class EvtchnDevice:
    """One open /dev/xen/evtchn of one client, carried by a socketpair."""

    def __init__(self, handle: int, client: "DmClient", sock: socket.socket) -> None:
        self.handle = handle
        self.client = client
        self.domain = client.domain
        self.sock = sock
        self.outbox = Outbox(sock)
        self.bindings: dict[int, Binding] = {}
        self.closed = False
        self._batching = False
        self._batch = bytearray()
        self._rbuf = bytearray(8 * 1024)

    # Xen -> client
    def deliver(self, binding: Binding) -> None:
        """The port fired: deliver it unless the driver has it masked."""
        if binding.masked:
            binding.pending = True
            return
        binding.masked = True  # the driver masks a port when it queues it
        # The same interrupt runs privcmd's ioeventfd handler (a shared IRQ).
        # It runs first here: in Linux it has claimed the slot long before
        # the reader the evtchn handler woke can look at it.
        kernel_ports = self.domain.privcmd.ports
        if kernel_ports and binding in kernel_ports:
            self.domain.privcmd.port_interrupt(binding)
        if self._batching:
            self._batch += binding.port_bytes
        else:
            self.outbox.send(binding.port_bytes)

    # client -> Xen
    def drain(self) -> bool:
        """Process every record the client has sent (never blocks). False
        once the client has closed its end."""
        while True:
            n = self._read_one()
            if n is None:
                return True
            if n == 0:
                return False

    def _read_one(self) -> int | None:
        """Act on one message of records: its length; None when none is
        waiting, 0 once the client has closed its end."""
        try:
            n = self.sock.recv_into(self._rbuf)
        except BlockingIOError:
            return None
        except OSError as exc:
            log.debug("event channel device %d: %s", self.handle, exc)
            return 0
        if n:
            self.process(self._rbuf, n)
        return n

    def process(self, buf, n: int) -> None:
        if n % EVTCHN_RECORD.size:
            log.warning(
                "event channel device %d: a message of %d bytes is not a whole number of 8-byte (op, port) records; "
                "the trailing %d bytes are ignored",
                self.handle,
                n,
                n % EVTCHN_RECORD.size,
            )
        batch = self._batch
        del batch[:]
        self._batching = True
        try:
            unpack = EVTCHN_RECORD.unpack_from
            bindings = self.bindings
            for off in range(0, n - n % EVTCHN_RECORD.size, EVTCHN_RECORD.size):
                op, port = unpack(buf, off)
                binding = bindings.get(port)
                if op == EVTCHN_OP_NOTIFY:
                    if binding is None:
                        log.debug("event channel device %d: notify of port %d, which it has not bound", self.handle, port)
                    elif binding.remote is not None:
                        self.domain.guest_port_notified(binding.remote)
                elif op == EVTCHN_OP_UNMASK:
                    if binding is not None and binding.masked:
                        binding.masked = False
                        if binding.pending:
                            binding.pending = False
                            self.deliver(binding)
                else:
                    log.warning("event channel device %d: unknown op %d (port %d) ignored", self.handle, op, port)
        finally:
            self._batching = False
        if batch:
            self.outbox.send(batch)

    def on_readable(self) -> None:
        """The poller's handler: act on one message of the client's records
        (the poller is level-triggered and calls again while more wait,
        which costs no failed read); at EOF the client closed the device,
        which unbinds all its ports."""
        if self._read_one() == 0:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for port in list(self.bindings):
            self.domain.unbind_local(self, port)
        self.client.devices.pop(self.handle, None)
        self.outbox.close()
        self.domain.poller.remove(self.sock)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class IrqChannel:
    """A device model's XEN_DMOP_set_irq_level on a socketpair the poller
    serves: binary (irq, level) requests, each answered with an errno, at
    the cost of a hypercall rather than of a control request. Acts on the
    client's event-channel records first, as a control request does."""

    def __init__(self, handle: int, client: "DmClient", sock: socket.socket) -> None:
        self.handle = handle
        self.client = client
        self.sock = sock
        self.outbox = Outbox(sock)
        self.closed = False
        self._buf = bytearray(IRQ_LEVEL_REQUEST.size + 1)  # a spare byte shows an oversized request

    def on_readable(self) -> None:
        while not self.closed:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("irq channel %d: %s", self.handle, exc)
                n = 0
            if n == 0:
                self.close()
                return
            err = errno.EINVAL
            if n == IRQ_LEVEL_REQUEST.size:
                irq, level = IRQ_LEVEL_REQUEST.unpack_from(self._buf)
                self.client.drain_devices()
                try:
                    self.client.domain.set_irq_level(irq, level)
                    err = 0
                except XenError as exc:
                    err = exc.errno
            self.outbox.send(IRQ_LEVEL_REPLY.pack(err))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.irq_channels.pop(self.handle, None)
        self.outbox.close()
        self.client.domain.poller.remove(self.sock)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


# --- ioreq servers and vCPUs ------------------------------------------------


class IoreqServer:
    __slots__ = (
        "id",
        "client",
        "bufioreq",
        "fd",
        "mm",
        "ioreq_off",
        "pages_allocated",
        "enabled",
        "ranges",
        "vcpu_ports",
        "buf_port",
    )

    def __init__(self, server_id: int, client: "DmClient", bufioreq: int) -> None:
        self.id = server_id
        self.client = client
        self.bufioreq = bufioreq
        npages = 2 if bufioreq else 1
        # One memfd per server: [buffered page,] ioreq page, as the frames
        # XENMEM_resource_ioreq_server numbers them (0 = bufioreq, 1 = ioreq).
        self.fd = os.memfd_create(f"xen-sim ioreq server {server_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, npages * abi.PAGE_SIZE)
        self.mm = mmap.mmap(self.fd, npages * abi.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.ioreq_off = abi.PAGE_SIZE if bufioreq else 0
        self.pages_allocated = False
        self.enabled = False
        self.ranges = [RangeSet() for _ in range(NR_IO_RANGE_TYPES)]
        self.vcpu_ports: list[GuestPort] = []
        self.buf_port: GuestPort | None = None

    def frame_offset(self, frame: int) -> int:
        """Byte offset of a resource frame in this server's memfd."""
        if frame == abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ:
            if not self.bufioreq:
                raise XenError(errno.ENOENT, f"ioreq server {self.id} has no buffered-ioreq page (frame 0)")
            return 0
        if frame == abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ:
            return self.ioreq_off
        raise XenError(
            errno.EINVAL,
            f"ioreq server {self.id} has no frame {frame} (0 = buffered page, 1 = ioreq page; "
            f"one ioreq page serves up to {GUEST_MAX_VCPUS} vCPUs)",
        )

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            log.debug("ioreq server %d: page still exported, left mapped", self.id)
        os.close(self.fd)


class Vcpu:
    """One guest vCPU as the trap path sees it. An access in flight is
    ``pending`` (the server holding its ioreq); the guest's answer is owed
    while ``answer_due`` and is sent as soon as the ioreq completes."""

    __slots__ = (
        "index",
        "slot_off",
        "outbox",
        "seq",
        "answer_due",
        "reply",
        "pending",
        "prev_state",
        "deadline",
        "addr",
        "size",
        "is_read",
        "hung_reported",
        "program",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.slot_off = index * abi.IOREQ_SIZE
        self.outbox: Outbox | None = None  # the attached guest's trap socket
        self.seq = 0
        self.answer_due = False
        self.reply = bytearray(TRAP_REPLY.size)
        self.pending: IoreqServer | None = None
        self.prev_state = STATE_NONE
        self.deadline = 0.0
        self.addr = 0
        self.size = 0
        self.is_read = False
        self.hung_reported = False
        self.program: VcpuLoop | None = None  # a vcpu_loop running on this vCPU

    def answer(self, status: int, data: int, message: str) -> None:
        """Answer the guest's current access (once)."""
        if not self.answer_due:
            return
        self.answer_due = False
        if self.program is not None:
            self.program.answered(self, status, message)
            return
        outbox = self.outbox
        if outbox is None:
            return
        reply = self.reply
        TRAP_REPLY.pack_into(reply, 0, status, 0, 0, self.seq, data)
        outbox.send(reply if not message else bytes(reply) + message.encode("utf-8", "replace"))

    def describe(self) -> str:
        return f"{'read' if self.is_read else 'write'} of {self.size} bytes at {self.addr:#x}"


# --- the domain -------------------------------------------------------------


class Domain:
    def __init__(self, args: argparse.Namespace) -> None:
        self.domid: int = args.domid
        self.nr_vcpus: int = args.vcpus
        self.arch: str = args.arch
        self.vcpu_timeout: float = args.vcpu_timeout
        self.irq_model: str = args.irq_model
        self.nr_spis: int = args.nr_spis
        self.strict_ranges: bool = args.strict_ranges
        self.ram_size = args.ram_mib << 20
        if args.ram_base == GUEST_RAM0_BASE and self.ram_size > GUEST_RAM0_SIZE:
            self.ram_regions = [
                {"gpa": GUEST_RAM0_BASE, "size": GUEST_RAM0_SIZE, "fd_offset": 0},
                {"gpa": GUEST_RAM1_BASE, "size": self.ram_size - GUEST_RAM0_SIZE, "fd_offset": GUEST_RAM0_SIZE},
            ]
        else:
            self.ram_regions = [{"gpa": args.ram_base, "size": self.ram_size, "fd_offset": 0}]
        self.ram_fd = os.memfd_create(f"xen-sim domain {self.domid} RAM", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, self.ram_size)
        self.servers: list[IoreqServer | None] = [None] * MAX_NR_IOREQ_SERVERS
        self.enabled_servers: list[IoreqServer] = []  # highest id first, as Xen iterates
        self.guest_ports: dict[int, GuestPort] = {}
        self.dom0_ports: dict[int, Binding] = {}
        self.vcpus = [Vcpu(i) for i in range(self.nr_vcpus)]
        self.irq_levels: dict[int, int] = {}
        self.irq_latched: set[int] = set()  # edges the vGIC holds pending while no guest is attached
        self.guest: GuestAttachment | None = None
        self.crashed: str | None = None
        self.poller = Poller()
        # dom0's privcmd ioeventfds and irqfds (see "the dom0 kernel's
        # privcmd eventfds" below)
        self.privcmd = PrivcmdEventfds(self, args)
        # xenstore, virtio devices, grant table, guest-memory counters (see
        # "the toolstack, guest pages and grants" below)
        self.toolstack = Toolstack(self, args)

    def close(self) -> None:
        self.privcmd.close()
        for server in self.servers:
            if server is not None:
                server.close()
        self.poller.close()
        os.close(self.ram_fd)

    def check_domid(self, domid: int) -> None:
        if domid != self.domid:
            raise XenError(errno.ESRCH, f"no domain with domid {domid} (the simulator runs domid {self.domid})")

    # --- event channel ports

    def _alloc_guest_port(self, server: IoreqServer, vcpu: int | None) -> GuestPort:
        ports = self.guest_ports
        for port in range(GUEST_FIRST_FREE_PORT, EVTCHN_2L_NR_CHANNELS):
            if port not in ports:
                gp = ports[port] = GuestPort(port, server, vcpu)
                return gp
        raise XenError(errno.ENOSPC, f"domain {self.domid} has no free event channel port")

    def _free_guest_port(self, gp: GuestPort) -> None:
        # free_xen_event_channel(): the dom0 end stays allocated but unbound.
        binding = gp.bound
        if binding is not None:
            binding.remote = None
            gp.bound = None
        self.guest_ports.pop(gp.port, None)

    def bind_interdomain(self, device: EvtchnDevice, remote_domid: int, remote_port: int) -> int:
        if remote_domid != self.domid:
            raise XenError(errno.ESRCH, f"no domain with domid {remote_domid} (the simulator runs domid {self.domid})")
        gp = self.guest_ports.get(remote_port)
        if gp is None:
            raise XenError(
                errno.EINVAL,
                f"port {remote_port} of domain {self.domid} is not an event channel allocated for dom0 "
                "(read vp_eport only after set_ioreq_server_state(enabled))",
            )
        if gp.bound is not None:
            raise XenError(
                errno.EINVAL, f"port {remote_port} of domain {self.domid} is already bound (to dom0 port {gp.bound.port})"
            )
        for local in range(DOM0_FIRST_FREE_PORT, EVTCHN_2L_NR_CHANNELS):
            if local not in self.dom0_ports:
                break
        else:
            raise XenError(errno.ENOSPC, "dom0 has no free event channel port")
        binding = Binding(local, device, gp)
        self.dom0_ports[local] = binding
        device.bindings[local] = binding
        gp.bound = binding
        # evtchn_bind_interdomain(): "We may have lost notifications on the
        # remote unbound port. Fix that up here by conservatively always
        # setting a notification on the local port."
        device.deliver(binding)
        return local

    def unbind_local(self, device: EvtchnDevice, port: int) -> None:
        binding = device.bindings.pop(port, None)
        if binding is None:
            raise XenError(errno.ENOTCONN, f"port {port} is not bound on event channel device {device.handle}")
        remote = binding.remote
        if remote is not None:
            remote.bound = None  # the guest end reverts to unbound (for dom0)
            binding.remote = None
        self.dom0_ports.pop(port, None)

    def fire(self, gp: GuestPort) -> None:
        """notify_via_xen_event_channel() on a guest port."""
        binding = gp.bound
        if binding is not None:
            binding.device.deliver(binding)
        # unbound: the event is lost, as in Xen (bind_interdomain fixes it up)

    def guest_port_notified(self, gp: GuestPort) -> None:
        """A device model notified its end of ``gp``: wake the vCPU waiting
        on it, which re-reads its slot (hvm_wait_for_io)."""
        vcpu_index = gp.vcpu
        if vcpu_index is None:
            return
        vcpu = self.vcpus[vcpu_index]
        server = gp.server
        if vcpu.pending is not server:
            return
        mm = server.mm
        off = server.ioreq_off + vcpu.slot_off
        flags = mm[off + OFF_FLAGS]
        state = flags & 0x0F
        prev = vcpu.prev_state
        if state == prev:
            return  # nothing changed: keep waiting
        if state == STATE_NONE:
            # Only an emulator racing its own death does this: Xen ends the
            # wait and the access completes with all-ones.
            log.warning(
                "vCPU %d: ioreq server %d reset the slot to NONE instead of completing the %s; the access gets all-ones",
                vcpu.index,
                server.id,
                vcpu.describe(),
            )
            self._finish(vcpu, TRAP_OK, SIZE_MASKS[vcpu.size] if vcpu.is_read else 0, "")
        elif state == STATE_IORESP_READY:
            data = _U64.unpack_from(mm, off + abi.OFF_DATA)[0] & SIZE_MASKS[vcpu.size] if vcpu.is_read else 0
            mm[off + OFF_FLAGS] = flags & 0xF0  # IORESP_READY -> NONE
            self._finish(vcpu, TRAP_OK, data, "")
        elif state < prev or state > STATE_IORESP_READY:
            if state > STATE_IORESP_READY:
                why = f"Weird HVM iorequest state {state}"
            else:
                why = f"Weird HVM ioreq state transition {STATE_NAMES[prev]} -> {STATE_NAMES[state]}"
            self.crash(f"vCPU {vcpu.index}, ioreq server {server.id}: {why} during the {vcpu.describe()}")
        else:
            vcpu.prev_state = state  # IOREQ_READY -> INPROCESS: keep waiting

    def _finish(self, vcpu: Vcpu, status: int, data: int, message: str) -> None:
        vcpu.pending = None
        if vcpu.answer_due:
            vcpu.answer(status, data, message)
        elif vcpu.hung_reported:
            log.warning("vCPU %d: the device model finally completed the %s", vcpu.index, vcpu.describe())
        vcpu.hung_reported = False

    def crash(self, reason: str) -> None:
        if self.crashed is None:
            self.crashed = reason
            log.error("domain %d crashed: %s", self.domid, reason)
        for vcpu in self.vcpus:
            if vcpu.pending is not None or vcpu.answer_due:
                self._finish(vcpu, TRAP_DOMAIN_CRASHED, 0, f"domain {self.domid} crashed: {self.crashed}")

    # --- ioreq servers

    def server(self, client: "DmClient", server_id: int) -> IoreqServer:
        server = self.servers[server_id] if server_id < MAX_NR_IOREQ_SERVERS else None
        if server is None:
            raise XenError(errno.ENOENT, f"domain {self.domid} has no ioreq server {server_id}")
        if server.client is not client:
            raise XenError(errno.EPERM, f"ioreq server {server_id} belongs to another device model")
        return server

    def create_server(self, client: "DmClient", bufioreq: int) -> IoreqServer:
        if self.arch != "x86" and bufioreq:
            raise XenError(
                errno.EINVAL,
                f"handle_bufioreq={bufioreq}: Xen supports buffered ioreqs only on x86; "
                "on Arm create the server with HVM_IOREQSRV_BUFIOREQ_OFF",
            )
        if bufioreq > abi.HVM_IOREQSRV_BUFIOREQ_ATOMIC:
            raise XenError(errno.EINVAL, f"handle_bufioreq={bufioreq} is not an HVM_IOREQSRV_BUFIOREQ_* value")
        for server_id, existing in enumerate(self.servers):
            if existing is None:
                break
        else:
            raise XenError(
                errno.ENOSPC, f"domain {self.domid} already has {MAX_NR_IOREQ_SERVERS} ioreq servers (MAX_NR_IOREQ_SERVERS)"
            )
        server = IoreqServer(server_id, client, bufioreq)
        try:
            for i in range(self.nr_vcpus):
                server.vcpu_ports.append(self._alloc_guest_port(server, i))
            if bufioreq:
                server.buf_port = self._alloc_guest_port(server, None)
        except XenError:
            for gp in server.vcpu_ports:
                self._free_guest_port(gp)
            server.close()
            raise
        self.servers[server_id] = server
        log.info("ioreq server %d created (guest ports %s)", server_id, [gp.port for gp in server.vcpu_ports])
        return server

    def acquire_pages(self, server: IoreqServer) -> None:
        """ioreq_server_alloc_pages(): the pages exist from the first
        XENMEM_acquire_resource on. Enabling earlier writes no vp_eport."""
        server.pages_allocated = True

    def set_server_state(self, server: IoreqServer, enabled: bool) -> None:
        if enabled and not server.enabled:
            server.enabled = True
            if server.pages_allocated:  # hvm_update_ioreq_evtchn() needs the page
                mm = server.mm
                for gp in server.vcpu_ports:
                    _U32.pack_into(mm, server.ioreq_off + gp.vcpu * abi.IOREQ_SIZE + abi.OFF_VP_EPORT, gp.port)
            else:
                log.warning(
                    "ioreq server %d enabled before its ioreq page was acquired: Xen writes no vp_eport now, "
                    "and guest accesses to its ranges will fail",
                    server.id,
                )
        elif not enabled:
            server.enabled = False
        self._rebuild_selection()

    def _rebuild_selection(self) -> None:
        self.enabled_servers = [s for s in reversed(self.servers) if s is not None and s.enabled]

    def map_range(self, server: IoreqServer, kind: int, start: int, end: int) -> None:
        rangeset = server.ranges[kind]
        hit = rangeset.overlapping(start, end)
        if hit is not None:
            raise XenError(
                errno.EEXIST,
                f"{RANGE_TYPE_NAMES[kind]} range {start:#x}-{end:#x} overlaps {hit[0]:#x}-{hit[1]:#x} "
                f"already mapped to ioreq server {server.id}",
            )
        for other in self.servers:
            if other is None or other is server:
                continue
            hit = other.ranges[kind].overlapping(start, end)
            if hit is None:
                continue
            if self.strict_ranges:
                raise XenError(
                    errno.EEXIST,
                    f"{RANGE_TYPE_NAMES[kind]} range {start:#x}-{end:#x} overlaps {hit[0]:#x}-{hit[1]:#x} of ioreq "
                    f"server {other.id} (--strict-ranges; Xen itself would accept it)",
                )
            log.warning(
                "%s range %#x-%#x of ioreq server %d overlaps %#x-%#x of ioreq server %d: Xen accepts this and "
                "sends each access to the highest-numbered enabled server whose ranges hold all of it",
                RANGE_TYPE_NAMES[kind],
                start,
                end,
                server.id,
                hit[0],
                hit[1],
                other.id,
            )
        rangeset.add(start, end)

    def unmap_range(self, server: IoreqServer, kind: int, start: int, end: int) -> None:
        rangeset = server.ranges[kind]
        if not rangeset.contains(start, end):
            raise XenError(
                errno.ENOENT,
                f"{RANGE_TYPE_NAMES[kind]} range {start:#x}-{end:#x} is not mapped to ioreq server {server.id} "
                f"(it has {', '.join(f'{s:#x}-{e:#x}' for s, e in rangeset.ranges()) or 'none'})",
            )
        rangeset.remove(start, end)

    def destroy_server(self, server: IoreqServer, why: str) -> None:
        server.enabled = False
        self.servers[server.id] = None
        self._rebuild_selection()
        self.privcmd.server_gone(server)  # its ioeventfds go with it
        for vcpu in self.vcpus:
            if vcpu.pending is server:
                self._finish(
                    vcpu,
                    TRAP_DM_GONE,
                    0,
                    f"device model gone: ioreq server {server.id} was {why} while vCPU {vcpu.index} "
                    f"waited for its {vcpu.describe()}",
                )
        for gp in server.vcpu_ports:
            self._free_guest_port(gp)
        if server.buf_port is not None:
            self._free_guest_port(server.buf_port)
        server.close()
        log.info("ioreq server %d %s", server.id, why)

    # --- interrupts

    def set_irq_level(self, irq: int, level: int) -> None:
        if self.arch == "x86":
            raise XenError(
                errno.EOPNOTSUPP, "XEN_DMOP_set_irq_level is Arm only (x86 has set_isa_irq_level / set_pci_intx_level)"
            )
        last = NR_LOCAL_IRQS + self.nr_spis - 1
        if not NR_LOCAL_IRQS <= irq <= last:
            raise XenError(errno.EINVAL, f"irq {irq} is not an SPI of domain {self.domid} (valid: {NR_LOCAL_IRQS} to {last})")
        if level not in (0, 1):
            raise XenError(errno.EINVAL, f"level {level} is neither 0 nor 1")
        prev = self.irq_levels.get(irq, 0)
        self.irq_levels[irq] = level
        # vgic_inject_irq() ignores a falling edge and latches every assert;
        # the "line" model only latches a 0 -> 1 transition.
        edge = level == 1 and (self.irq_model == "xen" or prev == 0)
        if not edge and level == prev:
            return
        guest = self.guest
        if guest is not None:
            guest.irq_outbox.send(IRQ_RECORD.pack(irq, level, edge, 0))
        elif edge:
            self.irq_latched.add(irq)

    # --- the vCPU trap path

    def select(self, addr: int, last: int) -> IoreqServer | None:
        """ioreq_server_select() for MMIO: the highest-numbered enabled server
        whose memory rangeset holds all of [addr, last]."""
        bisect_right = bisect.bisect_right
        for server in self.enabled_servers:
            r = server.ranges[abi.XEN_DMOP_IO_RANGE_MEMORY]
            i = bisect_right(r.starts, addr) - 1
            if i >= 0 and r.ends[i] >= last:
                return server
        return None

    def access(self, vcpu: Vcpu, kind: int, size: int, addr: int, data: int) -> None:
        """The guest's vCPU traps on an MMIO access (try_fwd_ioserv + ioreq_send).
        Errors are answered at once; a forwarded access is answered when the
        device model completes it (guest_port_notified) or the watchdog fires."""
        if self.crashed is not None:
            vcpu.answer(TRAP_DOMAIN_CRASHED, 0, f"domain {self.domid} crashed: {self.crashed}")
            return
        if vcpu.pending is not None:
            vcpu.answer(
                TRAP_VCPU_HUNG,
                0,
                f"vCPU {vcpu.index} is still blocked on its {vcpu.describe()}: ioreq server {vcpu.pending.id} "
                "has not completed it (real Xen would keep this vCPU blocked until it does)",
            )
            return
        mask = SIZE_MASKS.get(size)
        if mask is None or (kind != TRAP_READ and kind != TRAP_WRITE) or addr + size - 1 > U64_MAX:
            vcpu.answer(TRAP_BAD_REQUEST, 0, f"bad access: kind {kind}, size {size}, address {addr:#x}")
            return
        server = self.select(addr, addr + size - 1)
        if server is None:
            vcpu.answer(TRAP_DATA_ABORT, 0, f"data abort: no ioreq server claims the {size}-byte access at {addr:#x}")
            return
        if not server.pages_allocated:
            self.crash(
                f"ioreq server {server.id} is enabled but its ioreq page was never acquired "
                "(XENMEM_acquire_resource): Xen would dereference a NULL ioreq page"
            )
            vcpu.answer(TRAP_DOMAIN_CRASHED, 0, f"domain {self.domid} crashed: {self.crashed}")
            return
        mm = server.mm
        off = server.ioreq_off + vcpu.slot_off
        flags = mm[off + OFF_FLAGS]
        gp = server.vcpu_ports[vcpu.index]
        if flags & 0x0F != STATE_NONE:
            vcpu.answer(
                TRAP_DATA_ABORT,
                0,
                f"data abort: device model set bad IO state {flags & 0x0F} in vCPU {vcpu.index}'s slot of ioreq server {server.id}",
            )
            return
        eport = _U32.unpack_from(mm, off + abi.OFF_VP_EPORT)[0]
        if eport != gp.port:
            vcpu.answer(
                TRAP_DATA_ABORT,
                0,
                f"data abort: device model set bad event channel {eport} in vCPU {vcpu.index}'s slot of ioreq server "
                f"{server.id} (Xen's port is {gp.port})",
            )
            return
        is_read = kind == TRAP_READ
        dir_flag = abi.FLAG_DIR_READ if is_read else 0
        # *p = *proto_p with state NONE, then state = IOREQ_READY after a barrier.
        abi.IOREQ_STRUCT.pack_into(mm, off, addr, 0 if is_read else data & mask, 1, size, gp.port, 0, dir_flag, TYPE_COPY)
        mm[off + OFF_FLAGS] = dir_flag | STATE_IOREQ_READY
        vcpu.pending = server
        vcpu.prev_state = STATE_IOREQ_READY
        vcpu.addr = addr
        vcpu.size = size
        vcpu.is_read = is_read
        vcpu.deadline = time.monotonic() + self.vcpu_timeout
        self.fire(gp)

    async def watchdog(self) -> None:
        """Answer a vCPU that waited too long with 'vcpu hung'. The slot is
        left to the device model (a late completion still clears it)."""
        period = min(max(self.vcpu_timeout / 10, 0.005), 0.25)
        while True:
            await trio.sleep(period)
            now = time.monotonic()
            for vcpu in self.vcpus:
                if vcpu.answer_due and vcpu.pending is not None and now >= vcpu.deadline:
                    message = self._hung_message(vcpu)
                    log.error("%s", message)
                    vcpu.hung_reported = True
                    vcpu.answer(TRAP_VCPU_HUNG, 0, message)

    def _hung_message(self, vcpu: Vcpu) -> str:
        server = vcpu.pending
        off = server.ioreq_off + vcpu.slot_off
        state = server.mm[off + OFF_FLAGS] & 0x0F
        gp = server.vcpu_ports[vcpu.index]
        binding = gp.bound
        if binding is None:
            why = f"guest port {gp.port} is not bound by any device model"
        elif state == STATE_IORESP_READY:
            why = f"the slot is IORESP_READY but dom0 port {binding.port} was never notified"
        elif binding.masked and state == STATE_IOREQ_READY:
            why = f"dom0 port {binding.port} was delivered and is still masked: the device model never took the ioreq"
        elif state == STATE_IOREQ_READY:
            why = f"dom0 port {binding.port} is pending but nobody took the ioreq"
        else:
            why = "the device model took the ioreq but never completed it"
        return (
            f"vcpu hung: vCPU {vcpu.index} waited {self.vcpu_timeout:g} s for ioreq server {server.id} to complete its "
            f"{vcpu.describe()} (slot state {STATE_NAMES.get(state, state)}; {why}); real Xen would block it forever"
        )


# --- the toolstack, guest pages and grants ------------------------------------

GNTTAB_NR_RESERVED_ENTRIES = 8  # grant_table.h: refs 0-7 are the toolstack's
GNTTAB_NR_ENTRIES = 64 * (abi.PAGE_SIZE // 8)  # max_grant_frames 64 (Xen's default) of 8-byte v1 entries
GFN_LIMIT = (1 << 64) // abi.PAGE_SIZE  # frames of a 64-bit guest-physical address space


class Grant:
    """One active entry of the guest's grant table (v1: a frame, a
    read-only flag and the domain it is granted to)."""

    __slots__ = ("gfn", "readonly", "domid")

    def __init__(self, gfn: int, readonly: bool, domid: int) -> None:
        self.gfn = gfn
        self.readonly = readonly
        self.domid = domid


class GrantTable:
    """The guest's grant table as the simulated guest's Linux fills it:
    references from 8 (0-7 are reserved), the lowest free run of references
    for each request, so consecutive grants get consecutive references."""

    def __init__(self, domid: int, nr_entries: int = GNTTAB_NR_ENTRIES) -> None:
        self.domid = domid
        self.nr_entries = nr_entries
        self.entries: dict[int, Grant] = {}

    def grant(self, gfn: int, count: int, readonly: bool, to_domid: int) -> int:
        """Grant ``count`` frames from ``gfn`` with consecutive references;
        returns the first."""
        if gfn + count > GFN_LIMIT:
            raise XenError(errno.EINVAL, f"gfn {gfn:#x}+{count} is beyond the guest-physical address space")
        entries = self.entries
        ref = GNTTAB_NR_RESERVED_ENTRIES
        while True:
            if ref + count > self.nr_entries:
                raise XenError(
                    errno.ENOSPC,
                    f"the grant table of domain {self.domid} has no {count} consecutive free references "
                    f"({len(entries)} of {self.nr_entries - GNTTAB_NR_RESERVED_ENTRIES} in use)",
                )
            clash = next((r for r in range(ref, ref + count) if r in entries), None)
            if clash is None:
                break
            ref = clash + 1
        for i in range(count):
            entries[ref + i] = Grant(gfn + i, readonly, to_domid)
        return ref

    def end(self, ref: int) -> None:
        if self.entries.pop(ref, None) is None:
            raise XenError(errno.EINVAL, f"grant reference {ref} of domain {self.domid} is not in use")

    def lookup(self, ref: int, mapper_domid: int, writable: bool) -> Grant:
        """What gnttab_map_grant_ref() checks before mapping ``ref``."""
        grant = self.entries.get(ref)
        if grant is None:
            raise XenError(
                errno.EINVAL, f"grant reference {ref} of domain {self.domid} is not an active grant (never granted, or revoked)"
            )
        if grant.domid != mapper_domid:
            raise XenError(
                errno.EINVAL,
                f"grant reference {ref} of domain {self.domid} is granted to domain {grant.domid}, not to dom{mapper_domid}",
            )
        if writable and grant.readonly:
            raise XenError(
                errno.EPERM,
                f"grant reference {ref} of domain {self.domid} is read-only and cannot be mapped read-write",
            )
        return grant


class Toolstack:
    """What the toolstack and the rest of Xen keep for the domain beyond
    ioreqs: the xenstore tree (filled at start-up as xen-init-dom0 and libxl
    would), the virtio devices of the guest's device tree, the guest's grant
    table, and counters of the guest memory device models mapped."""

    def __init__(self, domain: "Domain", args: argparse.Namespace) -> None:
        self.domain = domain
        self.devices: list[sim_xenstore.VirtioMmioDevice] = list(getattr(args, "virtio_devices", None) or [])
        self.xenstore = sim_xenstore.XenStoreTree()
        sim_xenstore.populate(self.xenstore, domain.domid, args.ram_mib, self.devices)
        self.grants = GrantTable(domain.domid)
        self.stats = {"map_foreign_calls": 0, "map_foreign_pages": 0, "map_grant_calls": 0, "map_grant_pages": 0}

    def _bank_of(self, gfn: int) -> dict | None:
        gpa = gfn * abi.PAGE_SIZE
        for region in self.domain.ram_regions:
            if region["gpa"] <= gpa < region["gpa"] + region["size"]:
                return region
        return None

    def ram_offset(self, gfn: int, count: int) -> int:
        """The RAM memfd offset of frames [gfn, gfn + count), which must all
        be RAM of one bank; else EINVAL naming the first bad gfn."""
        page = abi.PAGE_SIZE
        bank = self._bank_of(gfn)
        if bank is None:
            raise XenError(errno.EINVAL, f"gfn {gfn:#x} (guest-physical {gfn * page:#x}) is not RAM of domain {self.domain.domid}")
        bank_end = (bank["gpa"] + bank["size"]) // page
        if gfn + count > bank_end:
            if self._bank_of(bank_end) is not None:
                raise XenError(
                    errno.EINVAL,
                    f"gfns {gfn:#x}-{gfn + count - 1:#x} run from one RAM bank into the next at gfn {bank_end:#x}: "
                    "map each bank on its own",
                )
            raise XenError(
                errno.EINVAL,
                f"gfn {bank_end:#x} (guest-physical {bank_end * page:#x}) is not RAM of domain {self.domain.domid} "
                f"(mapping {count} frames from gfn {gfn:#x})",
            )
        return bank["fd_offset"] + gfn * page - bank["gpa"]

    def map_foreign(self, gfn: int, count: int) -> int:
        offset = self.ram_offset(gfn, count)
        self.stats["map_foreign_calls"] += 1
        self.stats["map_foreign_pages"] += count
        return offset

    def map_grant_refs(self, refs: list[int]) -> list[int]:
        """gntdev's map of ``refs`` for dom0, read-write: each one's offset
        in the RAM memfd."""
        offsets = []
        for ref in refs:
            grant = self.grants.lookup(ref, 0, writable=True)
            try:
                offsets.append(self.ram_offset(grant.gfn, 1))
            except XenError as exc:  # GNTST_bad_page
                raise XenError(exc.errno, f"grant reference {ref}: {exc}") from None
        self.stats["map_grant_calls"] += 1
        self.stats["map_grant_pages"] += len(refs)
        return offsets

    def snapshot(self) -> dict:
        return {**self.stats, "grants_active": len(self.grants.entries), "xs_watches": len(self.xenstore.watches())}

    # --- the guest's requests on its control connection

    def guest_op(self, op: str, args: dict) -> dict:
        if op == "devices":
            return ok_reply(devices=[device.as_dict() for device in self.devices])
        if op == "grant_access":
            ref = self.grants.grant(args["gfn"], 1, args["readonly"], args.get("backend_domid", 0))
            return ok_reply(ref=ref)
        if op == "grant_access_seq":
            ref = self.grants.grant(args["gfn"], args["count"], args["readonly"], args.get("backend_domid", 0))
            return ok_reply(ref=ref)
        if op == "end_access":
            self.grants.end(args["ref"])
            return ok_reply()
        raise XenError(
            errno.EINVAL,
            f"op {op!r} is not available to the guest: its connection takes no requests after hello "
            "but devices, grant_access, grant_access_seq, end_access and vcpu_loop",
        )


class XsHandle:
    """One xenstore connection of a device model (dom0): its connection to
    the tree, and the socketpair end its watch events go out on. The client
    closing its end closes the handle and drops its watches."""

    def __init__(self, handle: int, client: "DmClient", sock: socket.socket) -> None:
        self.handle = handle
        self.client = client
        self.domain = client.domain
        self.sock = sock
        self.outbox = Outbox(sock)
        self.conn = self.domain.toolstack.xenstore.connect(0, self.deliver)
        self.closed = False
        self._rbuf = bytearray(256)

    def deliver(self, path: str, token: str) -> None:
        self.outbox.send(control.encode_watch_event(path, token))

    def alive(self) -> bool:
        """Discard whatever the client wrote (it has nothing to say here);
        False once it has closed its end."""
        while True:
            try:
                n = self.sock.recv_into(self._rbuf)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if n == 0:
                return False

    def on_readable(self) -> None:
        if not self.alive():
            self.close()

    def call(self, fn: Callable[[sim_xenstore.XsConnection], object]):
        try:
            return fn(self.conn)
        except sim_xenstore.XsError as exc:
            raise XenError(exc.errno, str(exc)) from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.conn.close()
        self.client.xs_handles.pop(self.handle, None)
        self.outbox.close()
        self.domain.poller.remove(self.sock)
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


# --- clients ------------------------------------------------------------------


class DmClient:
    """A device model (a dom0 process) on one control connection."""

    def __init__(self, domain: Domain, nursery: trio.Nursery) -> None:
        self.domain = domain
        self.nursery = nursery
        self.devices: dict[int, EvtchnDevice] = {}
        self._next_handle = 1
        self.handlers = {
            "nr_vcpus": self.op_nr_vcpus,
            "create_ioreq_server": self.op_create_ioreq_server,
            "get_ioreq_server_info": self.op_get_ioreq_server_info,
            "map_io_range_to_ioreq_server": self.op_map_io_range,
            "unmap_io_range_from_ioreq_server": self.op_unmap_io_range,
            "set_ioreq_server_state": self.op_set_ioreq_server_state,
            "destroy_ioreq_server": self.op_destroy_ioreq_server,
            "set_irq_level": self.op_set_irq_level,
            "map_resource": self.op_map_resource,
            "evtchn_open": self.op_evtchn_open,
            "evtchn_bind_interdomain": self.op_evtchn_bind_interdomain,
            "evtchn_unbind": self.op_evtchn_unbind,
            "evtchn_sync": self.op_evtchn_sync,
            "guest_ram": self.op_guest_ram,
            # xenstore, guest pages, grants (the toolstack block of ops below)
            "xs_open": self.op_xs_open,
            "xs_read": self.op_xs_read,
            "xs_write": self.op_xs_write,
            "xs_directory": self.op_xs_directory,
            "xs_rm": self.op_xs_rm,
            "xs_watch": self.op_xs_watch,
            "xs_unwatch": self.op_xs_unwatch,
            "map_foreign": self.op_map_foreign,
            "map_grant_refs": self.op_map_grant_refs,
            "stats": self.op_stats,
            # the dom0 kernel's privcmd eventfd ioctls (PrivcmdEventfds)
            "privcmd_ioeventfd": self.op_privcmd_ioeventfd,
            "privcmd_irqfd": self.op_privcmd_irqfd,
            "irq_channel_open": self.op_irq_channel_open,
        }
        self.xs_handles: dict[int, XsHandle] = {}
        self.irq_channels: dict[int, IrqChannel] = {}

    def drain_devices(self) -> None:
        """Act on everything this client sent on its event-channel devices
        before a control request, so the two channels stay in order."""
        for device in list(self.devices.values()):
            device.drain()

    def dispatch(self, op: str, args: dict) -> tuple[dict, list[int], list]:
        """Returns (reply, fds to send, objects to close once sent)."""
        handler = self.handlers.get(op)
        if handler is None:
            raise XenError(errno.EINVAL, f"op {op!r} is not available to a device model")
        if "domid" in args:
            self.domain.check_domid(args["domid"])
        return handler(**{k: v for k, v in args.items() if k != "domid"})

    def op_nr_vcpus(self):
        return ok_reply(vcpus=self.domain.nr_vcpus), [], []

    def op_create_ioreq_server(self, handle_bufioreq: int):
        server = self.domain.create_server(self, handle_bufioreq)
        return ok_reply(id=server.id), [], []

    def op_get_ioreq_server_info(self, id: int):
        server = self.domain.server(self, id)
        port = server.buf_port.port if server.buf_port is not None else None
        return ok_reply(bufioreq_port=port), [], []

    def _range_args(self, id: int, type: int, start: int, end: int) -> IoreqServer:
        if start > end:
            raise XenError(errno.EINVAL, f"range start {start:#x} is above its (inclusive) end {end:#x}")
        server = self.domain.server(self, id)
        if type not in RANGE_TYPE_NAMES:
            raise XenError(errno.EINVAL, f"range type {type} is not XEN_DMOP_IO_RANGE_PORT, _MEMORY or _PCI")
        return server

    def op_map_io_range(self, id: int, type: int, start: int, end: int):
        server = self._range_args(id, type, start, end)
        self.domain.map_range(server, type, start, end)
        return ok_reply(), [], []

    def op_unmap_io_range(self, id: int, type: int, start: int, end: int):
        server = self._range_args(id, type, start, end)
        self.domain.unmap_range(server, type, start, end)
        return ok_reply(), [], []

    def op_set_ioreq_server_state(self, id: int, enabled: bool):
        self.domain.set_server_state(self.domain.server(self, id), enabled)
        return ok_reply(), [], []

    def op_destroy_ioreq_server(self, id: int):
        self.domain.destroy_server(self.domain.server(self, id), "destroyed by its device model")
        return ok_reply(), [], []

    def op_set_irq_level(self, irq: int, level: int):
        self.domain.set_irq_level(irq, level)
        return ok_reply(), [], []

    def op_irq_channel_open(self):
        return self._open_channel(self.irq_channels, IrqChannel)

    def op_map_resource(self, type: int, id: int, frame: int, nr_frames: int):
        if type != abi.XENMEM_RESOURCE_IOREQ_SERVER:
            raise XenError(
                errno.EOPNOTSUPP, f"resource type {type} is not simulated (only XENMEM_resource_ioreq_server = 0)"
            )
        if nr_frames == 0:
            raise XenError(errno.EINVAL, "nr_frames is 0 (size queries are not simulated)")
        server = self.domain.server(self, id)
        self.domain.acquire_pages(server)
        first = server.frame_offset(frame)
        for extra in range(1, nr_frames):
            if server.frame_offset(frame + extra) != first + extra * abi.PAGE_SIZE:
                raise XenError(errno.EINVAL, f"frames {frame}..{frame + nr_frames - 1} are not contiguous")
        return ok_reply(offset=first, length=nr_frames * abi.PAGE_SIZE), [server.fd], []

    def _open_channel(self, table: dict, make: Callable):
        """Hand the client one end of a socketpair that the poller serves
        (an event-channel device, a xenstore handle); handles are unique
        across both kinds."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        handle = self._next_handle
        self._next_handle += 1
        channel = make(handle, self, ours)
        table[handle] = channel
        self.domain.poller.add(ours, channel.on_readable)
        self.nursery.start_soon(channel.outbox.run)
        return ok_reply(handle=handle), [theirs.fileno()], [theirs]

    def op_evtchn_open(self):
        return self._open_channel(self.devices, EvtchnDevice)

    def _device(self, handle: int) -> EvtchnDevice:
        device = self.devices.get(handle)
        if device is None:
            raise XenError(errno.EBADF, f"no open event channel device {handle} on this connection")
        return device

    def op_evtchn_bind_interdomain(self, handle: int, remote_domid: int, remote_port: int):
        port = self.domain.bind_interdomain(self._device(handle), remote_domid, remote_port)
        return ok_reply(port=port), [], []

    def op_evtchn_sync(self):
        return ok_reply(), [], []  # the records were acted on before dispatch

    def op_evtchn_unbind(self, handle: int, port: int):
        self.domain.unbind_local(self._device(handle), port)
        return ok_reply(), [], []

    def op_guest_ram(self):
        return ok_reply(regions=self.domain.ram_regions), [self.domain.ram_fd], []

    # --- xenstore, guest pages, grants (the toolstack side of the simulator)

    def op_xs_open(self):
        return self._open_channel(self.xs_handles, XsHandle)

    def _xs(self, handle: int) -> XsHandle:
        xs = self.xs_handles.get(handle)
        if xs is not None and not xs.alive():  # closed by the client, not yet noticed
            xs.close()
            xs = None
        if xs is None:
            raise XenError(errno.EBADF, f"no open xenstore handle {handle} on this connection")
        return xs

    def op_xs_read(self, handle: int, path: str):
        return ok_reply(value=self._xs(handle).call(lambda conn: conn.read(path))), [], []

    def op_xs_write(self, handle: int, path: str, value: str):
        self._xs(handle).call(lambda conn: conn.write(path, value))
        return ok_reply(), [], []

    def op_xs_directory(self, handle: int, path: str):
        return ok_reply(names=self._xs(handle).call(lambda conn: conn.directory(path))), [], []

    def op_xs_rm(self, handle: int, path: str):
        self._xs(handle).call(lambda conn: conn.rm(path))
        return ok_reply(), [], []

    def op_xs_watch(self, handle: int, path: str, token: str):
        self._xs(handle).call(lambda conn: conn.watch(path, token))
        return ok_reply(), [], []

    def op_xs_unwatch(self, handle: int, path: str, token: str):
        self._xs(handle).call(lambda conn: conn.unwatch(path, token))
        return ok_reply(), [], []

    def op_map_foreign(self, gfn: int, count: int):
        offset = self.domain.toolstack.map_foreign(gfn, count)
        return ok_reply(offset=offset, length=count * abi.PAGE_SIZE), [self.domain.ram_fd], []

    def op_map_grant_refs(self, refs: list[int]):
        offsets = self.domain.toolstack.map_grant_refs(refs)
        return ok_reply(offsets=offsets), [self.domain.ram_fd], []

    def op_stats(self):
        servers = sum(1 for server in self.domain.servers if server is not None)
        return ok_reply(**self.domain.toolstack.snapshot(), **self.domain.privcmd.counts, ioreq_servers=servers), [], []

    # --- the dom0 kernel's privcmd eventfd ioctls (fd: the request's eventfd,
    # closed once the request is answered; PrivcmdEventfds keeps its own dup)

    def op_privcmd_ioeventfd(self, id: int, ports: list[int], addr: int, addr_len: int, vq: int, flags: int, fd: int):
        self.domain.privcmd.ioeventfd(self, id, ports, addr, addr_len, vq, flags, fd)
        return ok_reply(), [], []

    def op_privcmd_irqfd(self, irq: int, flags: int, fd: int):
        self.domain.privcmd.irqfd(self, irq, flags, fd)
        return ok_reply(), [], []

    def teardown(self) -> None:
        """The device model went away: its servers go (Xen would keep them and
        the vCPUs would hang; the simulator says 'device model gone')."""
        for server in list(self.domain.servers):
            if server is not None and server.client is self:
                self.domain.destroy_server(server, "destroyed because its device model disconnected")
        self.domain.privcmd.client_gone(self)  # its irqfds go too
        for device in list(self.devices.values()):
            device.close()
        for xs in list(self.xs_handles.values()):  # their watches die with the connection
            xs.close()
        for channel in list(self.irq_channels.values()):
            channel.close()


class GuestAttachment:
    """The simulated guest: its vCPU trap sockets and interrupt channel."""

    def __init__(self, domain: Domain, control: socket.socket | None = None) -> None:
        self.domain = domain
        self.control = control
        self.detached = trio.Event()
        self.vcpu_socks: list[socket.socket] = []
        self.guest_ends: list[socket.socket] = []
        for _ in range(domain.nr_vcpus):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            self.vcpu_socks.append(ours)
            self.guest_ends.append(theirs)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.irq_sock = ours
        self.irq_outbox = Outbox(ours)
        self.guest_ends.append(theirs)

    def hung_up(self) -> bool:
        """Whether the guest already closed its control connection (the
        detach may not have run yet)."""
        if self.control is None or self.control.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLRDHUP)
        return bool(poller.poll(0))

    def close_guest_ends(self) -> None:
        for sock in self.guest_ends:
            sock.close()
        self.guest_ends = []

    def close(self) -> None:
        self.close_guest_ends()
        for sock in self.vcpu_socks:
            self.domain.poller.remove(sock)
            trio.lowlevel.notify_closing(sock)
            sock.close()
        self.irq_outbox.close()
        trio.lowlevel.notify_closing(self.irq_sock)
        self.irq_sock.close()

    def replay_interrupts(self) -> None:
        """Tell a newly attached guest the line levels and latched edges."""
        domain = self.domain
        for irq in sorted(set(domain.irq_levels) | domain.irq_latched):
            level = domain.irq_levels.get(irq, 0)
            edge = irq in domain.irq_latched
            if level or edge:
                self.irq_outbox.send(IRQ_RECORD.pack(irq, level, edge, 0))
        domain.irq_latched.clear()

    def trap_handler(self, vcpu: Vcpu, sock: socket.socket) -> Callable[[], None]:
        """The poller's handler for one vCPU's trap socket."""
        access = self.domain.access
        poller = self.domain.poller
        buf = bytearray(TRAP_REQUEST.size + 1)  # one spare byte shows an oversized message
        unpack = TRAP_REQUEST.unpack_from
        request_size = TRAP_REQUEST.size

        def on_readable() -> None:
            # One request per call: a vCPU has one access in flight, and if
            # more is queued the level-triggered poller calls again.
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("vCPU %d trap socket: %s", vcpu.index, exc)
                poller.remove(sock)
                return
            if n == 0:
                poller.remove(sock)  # the guest closed it
                return
            if vcpu.program is not None:
                # The vCPU is running the guest's vcpu_loop: this access
                # cannot be taken, and must not disturb the loop.
                seq = unpack(buf)[3] if n == request_size else 0
                message = f"vCPU {vcpu.index} is running a vcpu_loop; access it once the loop has ended".encode()
                if vcpu.outbox is not None:
                    vcpu.outbox.send(TRAP_REPLY.pack(TRAP_BAD_REQUEST, 0, 0, seq, 0) + message)
                return
            vcpu.answer_due = True
            if n != request_size:
                vcpu.seq = 0
                vcpu.answer(TRAP_BAD_REQUEST, 0, f"trap request of {n} bytes (expected {request_size})")
            else:
                kind, size, _reserved, seq, addr, data = unpack(buf)
                vcpu.seq = seq
                access(vcpu, kind, size, addr, data)

        return on_readable


# --- the dom0 kernel's privcmd eventfds -------------------------------------------

VIRTIO_MMIO_QUEUE_NOTIFY = 0x50
QUEUE_NOTIFY_VQ_MASK = 0xFFFF  # privcmd.c: the queue index is the low 16 bits written
PRIVCMD_FLAG_DEASSIGN = 1  # PRIVCMD_IOEVENTFD_FLAG_DEASSIGN and PRIVCMD_IRQFD_FLAG_DEASSIGN
IOEVENTFD_ADDR_LENS = (1, 2, 4, 8)  # "Vhost requires us to support length 1, 2, 4, and 8"
_IOREQ_HEAD = struct.Struct("<QQII")  # addr, data, count, size


def eventfd_identity(fd: int) -> int:
    """Which eventfd ``fd`` is: every fd of one eventfd (dups, copies passed
    over SCM_RIGHTS) gives the same number, as the kernel compares
    eventfd_ctx pointers. fstat() cannot tell eventfds apart (they all share
    one anonymous inode), so this reads ``eventfd-id`` from fdinfo; the id
    stays unique while the simulator holds the eventfd. EINVAL when ``fd``
    is not an eventfd, as eventfd_ctx_fdget() answers."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="utf-8", errors="replace") as f:
            info = f.read()
    except OSError as exc:
        raise XenError(errno.EBADF, f"cannot inspect the file descriptor sent ({exc.strerror})") from None
    is_eventfd = False
    identity = None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key == "eventfd-count":
            is_eventfd = True
        elif key == "eventfd-id":
            identity = int(value.strip())
    if not is_eventfd:
        raise XenError(errno.EINVAL, "the file descriptor sent is not an eventfd")
    if identity is None:
        raise XenError(
            errno.ENOSYS, "this host's kernel shows no eventfd-id in fdinfo: the simulator cannot tell eventfds apart"
        )
    return identity


class HeldEventfd:
    """The kernel's reference to an eventfd (eventfd_ctx_fdget): a dup of
    the fd the request brought, closed when the registration goes."""

    __slots__ = ("fd", "identity")

    def __init__(self, fd: int, identity: int) -> None:
        self.identity = identity
        self.fd = os.dup(fd)

    def signal(self) -> None:
        """eventfd_signal(ctx, 1)."""
        try:
            os.eventfd_write(self.fd, 1)
        except OSError as exc:  # only a counter at its maximum, on a nonblocking eventfd
            log.warning("privcmd: cannot signal eventfd %d: %s", self.identity, exc)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KernelIoeventfd:
    """privcmd_kernel_ioeventfd: a QueueNotify write of ``vq`` at ``addr``
    + 0x50, ``addr_len`` bytes wide, signals ``eventfd``."""

    __slots__ = ("eventfd", "addr", "notify_addr", "addr_len", "vq")

    def __init__(self, eventfd: HeldEventfd, addr: int, addr_len: int, vq: int) -> None:
        self.eventfd = eventfd
        self.addr = addr
        self.notify_addr = (addr + VIRTIO_MMIO_QUEUE_NOTIFY) & U64_MAX
        self.addr_len = addr_len
        self.vq = vq


class KernelIoreq:
    """privcmd_kernel_ioreq: the kernel's hold on one ioreq server's page,
    its handler on each vCPU's local port (``bindings``, vCPU order), and
    its ioeventfds, matched first registered first. ``held`` maps a vCPU
    whose slot the handler holds INPROCESS to the token of its pending
    decision."""

    __slots__ = ("server", "client", "bindings", "ioeventfds", "held")

    def __init__(self, server: IoreqServer, client: "DmClient", bindings: list[Binding]) -> None:
        self.server = server
        self.client = client
        self.bindings = bindings
        self.ioeventfds: list[KernelIoeventfd] = []
        self.held: dict[int, object] = {}


class KernelIrqfd:
    """privcmd_kernel_irqfd: each signal of ``eventfd`` issues the prepared
    XEN_DMOP_set_irq_level(irq, 1). Watched by the poller (``fileno``)."""

    __slots__ = ("domain", "client", "irq", "eventfd", "failing", "_buf")

    def __init__(self, domain: Domain, client: "DmClient", irq: int, eventfd: HeldEventfd) -> None:
        self.domain = domain
        self.client = client
        self.irq = irq
        self.eventfd = eventfd
        self.failing = False
        self._buf = bytearray(8)

    def fileno(self) -> int:
        return self.eventfd.fd

    def on_readable(self) -> None:
        """irqfd_wakeup() -> irqfd_inject(): take the count, issue the dm_op."""
        fd = self.eventfd.fd
        try:
            # Never block: the eventfd is shared with its owner, who may read it first.
            os.preadv(fd, [self._buf], -1, os.RWF_NOWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP or not select.select([fd], [], [], 0)[0]:
                raise
            os.read(fd, 8)  # a kernel without RWF_NOWAIT for eventfds
        try:
            self.domain.set_irq_level(self.irq, 1)
            self.domain.privcmd.counts["kernel_irqs"] += 1
        except XenError as exc:
            if not self.failing:  # irqfd_inject() reports the first of a run of failures
                log.error("privcmd: irqfd for irq %d: set_irq_level failed: %s", self.irq, exc)
            self.failing = True
        else:
            self.failing = False


class PrivcmdEventfds:
    """IOCTL_PRIVCMD_IOEVENTFD and IOCTL_PRIVCMD_IRQFD as dom0's Linux
    (>= 6.7, CONFIG_XEN_PRIVCMD_EVENTFD) does them; the module docstring
    says what is modelled and where it departs from Linux."""

    def __init__(self, domain: Domain, args: argparse.Namespace) -> None:
        self.domain = domain
        self.supported: bool = args.kernel_fast_path
        self.hold: float = args.fast_path_hold_us / 1e6
        self.ioreqs: dict[IoreqServer, KernelIoreq] = {}
        # The ports with an ioeventfd handler: EvtchnDevice.deliver() runs it.
        self.ports: dict[Binding, tuple[KernelIoreq, int]] = {}
        self.irqfds: list[KernelIrqfd] = []
        # What the fast path did instead of the device model (for op stats).
        self.counts = {"kernel_kicks": 0, "kernel_irqs": 0}

    def _check(self, ioctl: str, flags: int) -> bool:
        """Whether the request deassigns (after the checks every request gets)."""
        if not self.supported:
            raise XenError(
                errno.ENOTTY,
                f"{ioctl}: this dom0 kernel has no privcmd eventfd support "
                "(the simulator runs with --no-kernel-fast-path, like Linux before 6.7)",
            )
        if flags & ~PRIVCMD_FLAG_DEASSIGN:
            raise XenError(errno.EINVAL, f"{ioctl}: flags {flags:#x} (only bit 0, DEASSIGN, is defined)")
        return bool(flags & PRIVCMD_FLAG_DEASSIGN)

    # --- IOCTL_PRIVCMD_IOEVENTFD

    def ioeventfd(
        self, client: "DmClient", server_id: int, ports: list[int], addr: int, addr_len: int, vq: int, flags: int, fd: int
    ) -> None:
        ioctl = "IOCTL_PRIVCMD_IOEVENTFD"
        deassign = self._check(ioctl, flags)
        server = self.domain.server(client, server_id)
        if deassign:
            identity = eventfd_identity(fd)
            kioreq = self.ioreqs.get(server)
            if kioreq is not None and len(ports) == len(kioreq.bindings):
                for registration in kioreq.ioeventfds:
                    if registration.eventfd.identity == identity:
                        self._settle(kioreq)
                        kioreq.ioeventfds.remove(registration)
                        registration.eventfd.close()
                        log.debug(
                            "privcmd: ioeventfd %#x vq %d of ioreq server %d removed",
                            registration.addr,
                            registration.vq,
                            server.id,
                        )
                        if not kioreq.ioeventfds:
                            self._free_ioreq(kioreq)
                        return
            raise XenError(errno.ENODEV, f"{ioctl}: that eventfd is not assigned to ioreq server {server.id}")
        if addr + addr_len > U64_MAX + 1:
            raise XenError(errno.EINVAL, f"{ioctl}: addr {addr:#x} + addr_len {addr_len} overflows")
        if addr_len not in IOEVENTFD_ADDR_LENS:
            raise XenError(errno.EINVAL, f"{ioctl}: addr_len {addr_len} is not 1, 2, 4 or 8")
        if not 1 <= len(ports) <= control.PRIVCMD_MAX_IOEVENTFD_VCPUS:
            raise XenError(errno.EINVAL, f"{ioctl}: {len(ports)} vCPUs (1 to {control.PRIVCMD_MAX_IOEVENTFD_VCPUS})")
        identity = eventfd_identity(fd)
        kioreq = self.ioreqs.get(server)
        if kioreq is not None:
            if len(ports) != len(kioreq.bindings):
                raise XenError(
                    errno.EINVAL,
                    f"{ioctl}: {len(ports)} vCPUs, but ioreq server {server.id}'s page is registered with "
                    f"{len(kioreq.bindings)}",
                )
            if any(r.eventfd.identity == identity for r in kioreq.ioeventfds):
                raise XenError(errno.EBUSY, f"{ioctl}: that eventfd is already assigned to ioreq server {server.id}")
            if ports != [b.port for b in kioreq.bindings]:
                raise XenError(
                    errno.EINVAL,
                    f"{ioctl}: ports {ports} differ from {[b.port for b in kioreq.bindings]}, with which ioreq "
                    f"server {server.id}'s page is registered (Linux would keep using those)",
                )
            for r in kioreq.ioeventfds:
                if r.addr == addr and r.vq == vq:
                    raise XenError(
                        errno.EEXIST,
                        f"{ioctl}: queue {vq} of the device at {addr:#x} already has an ioeventfd on ioreq server "
                        f"{server.id} (Linux would accept this one and never signal it)",
                    )
            bindings = kioreq.bindings
        else:
            bindings = self._vcpu_bindings(ioctl, client, server, ports)
        registration = KernelIoeventfd(HeldEventfd(fd, identity), addr, addr_len, vq)
        if kioreq is None:
            kioreq = self.ioreqs[server] = KernelIoreq(server, client, bindings)
            for vcpu, binding in enumerate(bindings):
                self.ports[binding] = (kioreq, vcpu)
        else:
            self._settle(kioreq)
        kioreq.ioeventfds.append(registration)
        log.debug("privcmd: ioeventfd %#x vq %d on ioreq server %d (ports %s)", addr, vq, server.id, ports)

    def _vcpu_bindings(self, ioctl: str, client: "DmClient", server: IoreqServer, ports: list[int]) -> list[Binding]:
        """The binding behind each port, which must be this client's binding
        of that vCPU's vp_eport of ``server``."""
        nr_vcpus = self.domain.nr_vcpus
        if len(ports) != nr_vcpus:
            raise XenError(
                errno.EINVAL, f"{ioctl}: {len(ports)} ports for the {nr_vcpus} vCPUs of domain {self.domain.domid}"
            )
        if not server.pages_allocated:
            raise XenError(errno.EFAULT, f"{ioctl}: the ioreq page of ioreq server {server.id} was never mapped")
        bindings = []
        for vcpu, port in enumerate(ports):
            gp = server.vcpu_ports[vcpu]
            binding = self.domain.dom0_ports.get(port)
            if binding is None or binding.device.client is not client or binding.remote is not gp:
                bound = gp.bound
                if bound is not None and bound.device.client is client:
                    expected = f"port {bound.port}"
                else:
                    expected = "nothing on this connection"
                raise XenError(
                    errno.EINVAL,
                    f"{ioctl}: port {port} (for vCPU {vcpu}) is not bound to ioreq server {server.id}'s vp_eport "
                    f"{gp.port} of vCPU {vcpu} (bound there: {expected})",
                )
            bindings.append(binding)
        return bindings

    def port_interrupt(self, binding: Binding) -> None:
        """ioeventfd_interrupt(): the port of one vCPU fired."""
        kioreq, vcpu = self.ports[binding]
        server = kioreq.server
        mm = server.mm
        off = server.ioreq_off + vcpu * abi.IOREQ_SIZE
        flags = mm[off + OFF_FLAGS]
        if flags & 0x0F != STATE_IOREQ_READY or flags & abi.FLAG_DIR_READ or mm[off + abi.OFF_TYPE] != TYPE_COPY:
            return  # IRQ_NONE: not a write waiting to be taken
        mm[off + OFF_FLAGS] = (flags & 0xF0) | STATE_INPROCESS
        if self.hold <= 0:
            self._decide(kioreq, vcpu)
            return
        token = kioreq.held[vcpu] = object()
        self.domain.poller.call_later(self.hold, lambda: self._release(kioreq, vcpu, token))

    def _release(self, kioreq: KernelIoreq, vcpu: int, token: object) -> None:
        if kioreq.held.get(vcpu) is token:  # not settled or dropped meanwhile
            del kioreq.held[vcpu]
            self._decide(kioreq, vcpu)

    def _settle(self, kioreq: KernelIoreq) -> None:
        """Decide every held slot now, before the registrations change (the
        kernel decides under the lock that assign and deassign take)."""
        while kioreq.held:
            vcpu = next(iter(kioreq.held))
            del kioreq.held[vcpu]
            self._decide(kioreq, vcpu)

    def _decide(self, kioreq: KernelIoreq, vcpu: int) -> None:
        server = kioreq.server
        mm = server.mm
        off = server.ioreq_off + vcpu * abi.IOREQ_SIZE
        addr, data, _count, size = _IOREQ_HEAD.unpack_from(mm, off)
        state = STATE_IOREQ_READY
        vq = data & QUEUE_NOTIFY_VQ_MASK
        for registration in kioreq.ioeventfds:
            if addr == registration.notify_addr and size == registration.addr_len and vq == registration.vq:
                registration.eventfd.signal()
                state = STATE_IORESP_READY
                self.counts["kernel_kicks"] += 1
                break
        mm[off + OFF_FLAGS] = (mm[off + OFF_FLAGS] & 0xF0) | state
        if state == STATE_IORESP_READY:
            remote = kioreq.bindings[vcpu].remote
            if remote is not None:  # notify_remote_via_evtchn(): as a device model's notify
                self.domain.guest_port_notified(remote)

    def _free_ioreq(self, kioreq: KernelIoreq) -> None:
        """ioreq_free(): unhook the port handlers; drop held decisions and
        the eventfds left."""
        self.ioreqs.pop(kioreq.server, None)
        for binding in kioreq.bindings:
            self.ports.pop(binding, None)
        kioreq.held.clear()
        for registration in kioreq.ioeventfds:
            registration.eventfd.close()
        kioreq.ioeventfds.clear()

    # --- IOCTL_PRIVCMD_IRQFD

    def irqfd(self, client: "DmClient", irq: int, flags: int, fd: int) -> None:
        ioctl = "IOCTL_PRIVCMD_IRQFD"
        deassign = self._check(ioctl, flags)
        identity = eventfd_identity(fd)
        if deassign:
            for irqfd in self.irqfds:
                if irqfd.eventfd.identity == identity:
                    self._free_irqfd(irqfd)
                    log.debug("privcmd: irqfd for irq %d removed", irqfd.irq)
                    return
            raise XenError(errno.ENOENT, f"{ioctl}: that eventfd has no irqfd (Linux would return 0)")
        if self.domain.arch == "x86":
            raise XenError(
                errno.EINVAL, f"{ioctl}: XEN_DMOP_set_irq_level is Arm only; the prepared dm_op would always fail"
            )
        last = NR_LOCAL_IRQS + self.domain.nr_spis - 1
        if not NR_LOCAL_IRQS <= irq <= last:
            raise XenError(
                errno.EINVAL,
                f"{ioctl}: irq {irq} is not an SPI of domain {self.domain.domid} (valid: {NR_LOCAL_IRQS} to {last})",
            )
        if any(irqfd.eventfd.identity == identity for irqfd in self.irqfds):
            raise XenError(errno.EBUSY, f"{ioctl}: that eventfd already has an irqfd")
        irqfd = KernelIrqfd(self.domain, client, irq, HeldEventfd(fd, identity))
        self.irqfds.append(irqfd)
        # Level triggered: a count already there is injected at once, as
        # privcmd_irqfd_assign() does when vfs_poll() finds EPOLLIN.
        self.domain.poller.add(irqfd, irqfd.on_readable)
        log.debug("privcmd: irqfd for irq %d", irq)

    def _free_irqfd(self, irqfd: KernelIrqfd) -> None:
        self.irqfds.remove(irqfd)
        self.domain.poller.remove(irqfd)
        irqfd.eventfd.close()

    # --- lifetime

    def server_gone(self, server: IoreqServer) -> None:
        kioreq = self.ioreqs.get(server)
        if kioreq is not None:
            self._free_ioreq(kioreq)
            log.debug("privcmd: the ioeventfds of ioreq server %d went with it", server.id)

    def client_gone(self, client: "DmClient") -> None:
        for kioreq in [k for k in self.ioreqs.values() if k.client is client]:
            self._free_ioreq(kioreq)
        for irqfd in [i for i in self.irqfds if i.client is client]:
            self._free_irqfd(irqfd)

    def close(self) -> None:
        for kioreq in list(self.ioreqs.values()):
            self._free_ioreq(kioreq)
        for irqfd in list(self.irqfds):
            self._free_irqfd(irqfd)


# --- the control socket ---------------------------------------------------------


class Simulator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path: str = args.control
        self.domain = Domain(args)
        self._socket_ino: int | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Bound with the stdlib socket: trio would bind a UNIX socket in a
        # worker thread, and this process has none.
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener = trio.socket.from_stdlib_socket(raw)
        try:
            _claim_socket_path(self.path)
            raw.bind(self.path)
            self._socket_ino = os.stat(self.path).st_ino
            os.chmod(self.path, 0o600)
            listener.listen(64)
            self.domain.poller.watch(listener.fileno())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.domain.watchdog)
                nursery.start_soon(self.domain.poller.run)
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self.serve_connection, conn)
        finally:
            self.domain.poller.remove(listener.fileno())
            listener.close()
            self.remove_socket()
            self.domain.close()

    def remove_socket(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if st.st_ino == self._socket_ino and stat.S_ISSOCK(st.st_mode):
            try:
                os.unlink(self.path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.path, exc)

    async def serve_connection(self, sock) -> None:
        with sock:
            self.domain.poller.watch(sock.fileno())
            try:
                await self._serve_connection(sock)
            # except*: trio may wrap what a nursery body raised in a group.
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as group:
                log.debug("control connection dropped: %s", group.exceptions[0])
            except* Exception:  # a simulator bug must not take the domain down
                log.exception("internal error on a control connection; closing it")
            finally:
                self.domain.poller.remove(sock.fileno())

    async def _reply(self, sock, reply: dict, request: dict | None, fds=()) -> None:
        if request is not None and type(request.get("seq")) is int:
            reply["seq"] = request["seq"]
        await control.trio_send_message(sock, reply, fds)

    async def _serve_connection(self, sock) -> None:
        domain = self.domain
        while True:  # until a valid hello
            received = await control.trio_recv_message(sock, max_fds=0)
            if received is None:
                return
            request = received.message
            try:
                if received.error is not None:
                    raise ProtocolError(received.error)
                op, args = control.validate_request(request)
                if op != "hello":
                    raise ProtocolError(f"the first request must be 'hello', not {op!r}")
                if args.get("protocol", control.PROTOCOL_VERSION) != control.PROTOCOL_VERSION:
                    raise ProtocolError(
                        f"protocol version {args['protocol']} is not supported (this simulator speaks {control.PROTOCOL_VERSION})"
                    )
                if "domid" in args:
                    domain.check_domid(args["domid"])
                elif args["role"] == "dm":
                    raise ProtocolError("hello: a device model must name its target 'domid'")
            except ProtocolError as exc:
                await self._reply(sock, error_reply(str(exc), errno.EBADMSG), request)
                continue
            except XenError as exc:
                await self._reply(sock, error_reply(str(exc), exc.errno), request)
                continue
            if args["role"] == "dm":
                await self._serve_dm(sock, request)
            else:
                await self._serve_guest(sock, request)
            return

    def _hello_fields(self) -> dict:
        d = self.domain
        return {
            "domid": d.domid,
            "vcpus": d.nr_vcpus,
            "arch": d.arch,
            "protocol": control.PROTOCOL_VERSION,
            "irq_model": d.irq_model,
        }

    async def _serve_dm(self, sock, hello: dict) -> None:
        client = None
        try:
            async with trio.open_nursery() as nursery:
                client = DmClient(self.domain, nursery)
                await self._reply(sock, ok_reply(**self._hello_fields()), hello)
                log.info("device model connected")
                await self._dm_requests(sock, client)
                nursery.cancel_scope.cancel()
        finally:
            # After the nursery: no task waits on the client's sockets any more.
            if client is not None:
                client.teardown()
                log.info("device model disconnected")

    async def _dm_requests(self, sock, client: DmClient) -> None:
        while True:
            received = await control.trio_recv_message(sock, max_fds=control.MAX_REQUEST_FDS)
            if received is None:
                return
            request = received.message
            to_close: list = []
            fds: list[int] = []
            try:
                if received.error is not None:
                    raise ProtocolError(received.error)
                op, args = control.validate_request(request)
                if op == "hello":
                    raise ProtocolError("hello was already said on this connection")
                control.check_request_fds(op, received.fds)
                if received.fds:  # control.REQUEST_FDS: the op's one fd
                    args["fd"] = received.fds[0]
                client.drain_devices()
                reply, fds, to_close = client.dispatch(op, args)
            except ProtocolError as exc:
                reply = error_reply(str(exc), errno.EBADMSG)
            except XenError as exc:
                reply = error_reply(str(exc), exc.errno)
            except Exception as exc:  # a simulator bug must not take the domain down
                log.exception("internal error serving %r", request)
                reply = error_reply(f"internal simulator error: {type(exc).__name__}: {exc}", errno.EIO)
            # Closed before the reply, as an ioctl drops its fd before it
            # returns; a handler dups what it keeps.
            control.close_fds(received.fds)
            try:
                await self._reply(sock, reply, request, fds)
            finally:
                for obj in to_close:
                    obj.close()

    async def _serve_guest(self, sock, hello: dict) -> None:
        domain = self.domain
        previous = domain.guest
        if previous is not None and previous.hung_up():
            # The guest before this one has gone; let its detach finish
            # rather than refuse a guest that merely came back quickly.
            with trio.move_on_after(5):
                await previous.detached.wait()
        if domain.guest is not None:
            await self._reply(sock, error_reply(f"a guest is already attached to domain {domain.domid}", errno.EBUSY), hello)
            return
        guest = GuestAttachment(domain, sock)
        domain.guest = guest
        try:
            fds = [domain.ram_fd] + [s.fileno() for s in guest.guest_ends]
            reply = ok_reply(**self._hello_fields(), ram=domain.ram_regions)
            try:
                await self._reply(sock, reply, hello, fds)
            finally:
                guest.close_guest_ends()
            guest.replay_interrupts()
            log.info("guest attached")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest.irq_outbox.run)
                for vcpu, vsock in zip(domain.vcpus, guest.vcpu_socks):
                    vcpu.outbox = Outbox(vsock)
                    vcpu.answer_due = False
                    nursery.start_soon(vcpu.outbox.run)
                    domain.poller.add(vsock, guest.trap_handler(vcpu, vsock))
                while True:
                    received = await control.trio_recv_message(sock, max_fds=0)
                    if received is None:
                        break
                    if received.error is None and received.message.get("op") == "vcpu_loop":
                        reply, fds = await self._vcpu_loop(received.message)
                        try:
                            await self._reply(sock, reply, received.message, fds)
                        finally:
                            control.close_fds(fds)
                        continue
                    await self._reply(sock, self._guest_request(received), received.message)
                nursery.cancel_scope.cancel()
        finally:
            domain.guest = None
            for vcpu in domain.vcpus:
                if vcpu.outbox is not None:
                    vcpu.outbox.close()
                vcpu.outbox = None
                vcpu.answer_due = False
            guest.close()
            guest.detached.set()
            log.info("guest detached")

    async def _vcpu_loop(self, request: dict) -> tuple[dict, list[int]]:
        """The guest-role op vcpu_loop (``xen.sim.vcpu_loop``): the reply,
        and a memfd of the accesses' latencies (u64 ns each)."""
        try:
            _op, args = control.validate_request(request)
            loop = self._make_vcpu_loop(args)
        except ProtocolError as exc:
            return error_reply(str(exc), errno.EBADMSG), []
        except XenError as exc:
            return error_reply(str(exc), exc.errno), []
        loop.start()
        try:
            await loop.done.wait()
        finally:
            loop.stop()
        if loop.error is not None:
            return error_reply(f"vcpu_loop: {loop.error}", errno.EIO), []
        fd = os.memfd_create("xen-sim vcpu_loop latencies", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(loop.samples.tobytes())
        except BaseException:
            os.close(fd)
            raise
        log.debug("vcpu_loop: %d accesses in %.3f s", len(loop.samples), loop.elapsed_ns / 1e9)
        return ok_reply(accesses=len(loop.samples), ns=loop.elapsed_ns), [fd]

    def _make_vcpu_loop(self, args: dict) -> VcpuLoop:
        domain = self.domain
        vcpus, addrs = args["vcpus"], args["addrs"]
        if len(vcpus) != len(addrs):
            raise XenError(errno.EINVAL, f"vcpu_loop: {len(vcpus)} vCPUs but {len(addrs)} addresses (one each)")
        if args["size"] not in SIZE_MASKS:
            raise XenError(errno.EINVAL, f"vcpu_loop: size {args['size']} is not 1, 2, 4 or 8")
        if not 1 <= args["ms"] <= VCPU_LOOP_MAX_MS:
            raise XenError(errno.EINVAL, f"vcpu_loop: ms {args['ms']} is not in [1, {VCPU_LOOP_MAX_MS}]")
        one_at_a_time = args.get("one_at_a_time", False)
        if not one_at_a_time and len(set(vcpus)) != len(vcpus):
            raise XenError(errno.EINVAL, "vcpu_loop: a vCPU is listed twice (each runs one loop; use one_at_a_time)")
        for index in vcpus:
            if index >= domain.nr_vcpus:
                raise XenError(errno.EINVAL, f"vcpu_loop: domain {domain.domid} has no vCPU {index} ({domain.nr_vcpus} vCPUs)")
            vcpu = domain.vcpus[index]
            if vcpu.answer_due or vcpu.program is not None:
                raise XenError(errno.EBUSY, f"vcpu_loop: vCPU {index} is in the middle of an access")
        plan = [(domain.vcpus[index], addr) for index, addr in zip(vcpus, addrs)]
        return VcpuLoop(
            domain.access,
            plan,
            args["size"],
            args["ms"],
            one_at_a_time=one_at_a_time,
        )

    def _guest_request(self, received: control.Received) -> dict:
        """The reply to one request on the guest's connection after hello:
        the guest-role ops (device tree, grant table)."""
        try:
            if received.error is not None:
                raise ProtocolError(received.error)
            op, args = control.validate_request(received.message)
            if op == "hello":
                raise ProtocolError("hello was already said on this connection")
            return self.domain.toolstack.guest_op(op, args)
        except ProtocolError as exc:
            return error_reply(str(exc), errno.EBADMSG)
        except XenError as exc:
            return error_reply(str(exc), exc.errno)
        except Exception as exc:  # a simulator bug must not take the domain down
            log.exception("internal error serving the guest's %r", received.message)
            return error_reply(f"internal simulator error: {type(exc).__name__}: {exc}", errno.EIO)


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead simulator; refuse a live one or
    anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"xen-sim: error: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError as exc:
        raise SystemExit(f"xen-sim: error: cannot use {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise SystemExit(f"xen-sim: error: another simulator is already listening on {path}")


# --- the command line ----------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xen-sim",
        description="A simulated Xen hypervisor running one guest domain, for xen-vhost-bridge's tests and demo.",
    )
    parser.add_argument("--control", required=True, metavar="PATH", help="the control socket to listen on")
    parser.add_argument("--domid", type=_int, default=1, metavar="N", help="the guest's domid (default: 1)")
    parser.add_argument("--vcpus", type=_int, default=1, metavar="N", help=f"guest vCPUs, 1 to {GUEST_MAX_VCPUS} (default: 1)")
    parser.add_argument("--ram-mib", type=_int, default=256, metavar="N", help="guest RAM in MiB (default: 256)")
    parser.add_argument(
        "--ram-base", type=_int, default=GUEST_RAM0_BASE, metavar="ADDR", help="guest-physical base of RAM (default: 0x40000000)"
    )
    parser.add_argument(
        "--vcpu-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="answer a vCPU that waited this long for its device model with 'vcpu hung' (default: 30)",
    )
    parser.add_argument(
        "--arch",
        choices=("arm", "x86"),
        default="arm",
        help="whose rules to follow: arm refuses buffered ioreq servers and has set_irq_level (default: arm)",
    )
    parser.add_argument(
        "--irq-model",
        choices=("xen", "line"),
        default="xen",
        help="xen: every set_irq_level(irq, 1) latches an edge, as Xen's vGIC does for an edge-triggered SPI; "
        "line: only a 0 -> 1 change of the line does (default: xen)",
    )
    parser.add_argument(
        "--nr-spis",
        type=_int,
        default=MAX_NR_SPIS,
        metavar="N",
        help=f"SPIs the guest's vGIC has: irqs 32 to 31+N (default and maximum: {MAX_NR_SPIS})",
    )
    parser.add_argument(
        "--strict-ranges",
        action="store_true",
        help="refuse MMIO ranges that overlap another ioreq server's (Xen accepts them)",
    )
    parser.add_argument(
        "--no-kernel-fast-path",
        dest="kernel_fast_path",
        action="store_false",
        help="model a dom0 kernel without privcmd ioeventfd/irqfd (Linux before 6.7): both ioctls fail with ENOTTY",
    )
    parser.add_argument(
        "--fast-path-hold-us",
        type=float,
        default=0.0,
        metavar="MICROSECONDS",
        help="how long the kernel's ioeventfd handler holds a guest write INPROCESS before it completes it or "
        "hands it back as IOREQ_READY, so a device model sees the slot held; 0 decides at once (default: 0)",
    )
    parser.add_argument(
        "--virtio",
        action="append",
        default=[],
        metavar="SPEC",
        help="a virtio-mmio device as xl.cfg's virtio=[...] names it: type=virtio,device<hex id>[,grant_usage=0|1]"
        "[,backend=<domid>], or blk, gpu, fs, net; repeatable. libxl's layout: device i at 0x2000000 + 0x200*i, SPI 33+i",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")
    args = parser.parse_args(argv)
    if not 1 <= args.vcpus <= GUEST_MAX_VCPUS:
        parser.error(f"--vcpus {args.vcpus}: a guest has 1 to {GUEST_MAX_VCPUS} vCPUs")
    if not 1 <= args.domid < DOMID_FIRST_RESERVED:
        parser.error(f"--domid {args.domid}: a guest's domid is 1 to {DOMID_FIRST_RESERVED - 1:#x}")
    if args.ram_mib < 1:
        parser.error("--ram-mib must be at least 1")
    if args.ram_base % abi.PAGE_SIZE or args.ram_base < 0:
        parser.error(f"--ram-base {args.ram_base:#x} is not page aligned")
    if args.ram_base == GUEST_RAM0_BASE:
        if args.ram_mib << 20 > GUEST_RAM0_SIZE + GUEST_RAM1_SIZE:
            parser.error(f"--ram-mib {args.ram_mib}: Xen on Arm's two RAM banks hold at most {(GUEST_RAM0_SIZE + GUEST_RAM1_SIZE) >> 20} MiB")
    elif args.ram_base + (args.ram_mib << 20) > 1 << 48:
        parser.error("--ram-base/--ram-mib: guest RAM would end beyond 48-bit physical addresses")
    if not args.vcpu_timeout > 0:
        parser.error("--vcpu-timeout must be positive")
    if not 1 <= args.nr_spis <= MAX_NR_SPIS:
        parser.error(f"--nr-spis {args.nr_spis}: a vGIC has 1 to {MAX_NR_SPIS} SPIs")
    if not 0 <= args.fast_path_hold_us <= 1e6:
        parser.error(f"--fast-path-hold-us {args.fast_path_hold_us:g}: 0 to 1000000 microseconds")
    try:
        args.virtio_devices = sim_xenstore.plan_virtio_devices(sim_xenstore.parse_virtio_spec(s) for s in args.virtio)
    except sim_xenstore.VirtioSpecError as exc:
        parser.error(f"--virtio {exc}")
    for device in args.virtio_devices:
        if device.backend_domid == args.domid:
            parser.error(f"--virtio: device {device.devid} names the guest (domain {args.domid}) as its own backend")
        if device.irq > NR_LOCAL_IRQS + args.nr_spis - 1:
            parser.error(f"--virtio: device {device.devid} needs SPI {device.irq}, beyond --nr-spis {args.nr_spis}")
    return args


async def _serve(args: argparse.Namespace) -> None:
    sim = Simulator(args)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            sys.stdout.write(f"xen-sim: ready {args.control}\n")
            sys.stdout.flush()
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="xen-sim: %(levelname)s: %(message)s",
    )
    failed = None
    try:
        trio.run(_serve, args)
    except* OSError as group:  # trio may deliver it inside an exception group
        failed = group.exceptions[0]
    except* SystemExit as group:
        raise group.exceptions[0] from None
    if failed is not None:
        sys.stderr.write(f"xen-sim: error: {args.control}: {failed.strerror or failed}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
