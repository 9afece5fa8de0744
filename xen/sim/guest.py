"""The simulated guest (domU) of the Xen simulator.

A test, the demo or a guest driver opens it in its own trio program::

    async with SimGuest.open(control_path) as guest:
        value = await guest.vcpus[0].read(0x02000000, 4)
        guest.on_irq(33, handler)

Each vCPU does one MMIO access at a time over its trap socket; the simulator
turns it into an ioreq for whichever ioreq server claims the address and
answers when the device model completes it. Interrupts arrive on a channel
of their own and are dispatched like a GIC dispatches an edge-triggered SPI:
the handler runs once per latched edge, and an edge that arrives while the
handler runs is latched and runs it again afterwards (edges that arrive while
one is already latched and not yet taken merge into it).

The guest also asks the simulator for its device tree (:meth:`SimGuest.devices`,
the virtio-mmio devices libxl laid out) and fills its grant table
(:meth:`SimGuest.grant_access`, :meth:`SimGuest.grant_access_seq`,
:meth:`SimGuest.end_access`, and :meth:`SimGuest.grant_dma_map` for a buffer
addressed the way Linux's xen-grant-dma addresses it).
"""

from __future__ import annotations

import array
import contextlib
import errno as errno_module
import logging
import mmap
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import trio

from xen.hypervisor import HypervisorError, HypervisorUnavailable
from xen.sim import control
from xen.sim.guest_memory import grant_address, grant_page_count, grant_ref_of
from xen.sim.xenstore import VirtioMmioDevice
from xen.sim.control import (
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
)

log = logging.getLogger(__name__)

_U64_MAX = 0xFFFFFFFFFFFFFFFF
_SIZES = (1, 2, 4, 8)


class GuestError(Exception):
    """An access the simulated guest made did not complete normally."""


class GuestAccessFault(GuestError):
    """Data abort: no ioreq server serves that address (or Xen refused to
    forward the access because the device model broke its slot)."""


class VcpuHung(GuestError):
    """The simulator's watchdog fired: the device model never completed the
    ioreq (real Xen would keep the vCPU blocked forever)."""


class DeviceModelGone(GuestError):
    """The ioreq server went away while the vCPU waited on it."""


class DomainCrashed(GuestError):
    """Xen would have crashed the domain (e.g. an ioreq state went backwards)."""


class GuestRequestError(GuestError):
    """The simulator refused a request of the guest's (a grant-table
    operation, say); ``errno`` is what Xen would return."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


_STATUS_ERRORS: dict[int, type[GuestError]] = {
    TRAP_DATA_ABORT: GuestAccessFault,
    TRAP_VCPU_HUNG: VcpuHung,
    TRAP_DM_GONE: DeviceModelGone,
    TRAP_DOMAIN_CRASHED: DomainCrashed,
    TRAP_BAD_REQUEST: GuestError,
}


class GuestRam:
    """Guest-physical RAM, mapped from the simulator's RAM memfd.

    ``base`` and ``size`` describe bank 0; ``banks`` lists every bank as
    (gpa, size, fd_offset) (a guest bigger than 3 GiB at the default base has
    a second bank at 0x200000000, as on Xen on Arm). An access must lie
    inside one bank."""

    def __init__(self, fd: int, regions: list[dict]) -> None:
        banks = sorted((r["gpa"], r["size"], r["fd_offset"]) for r in regions)
        if not banks:
            raise ValueError("the simulator reported no guest RAM")
        total = max(off + size for _gpa, size, off in banks)
        self._mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mm)
        self.banks = banks
        self.base, self.size = banks[0][0], banks[0][1]

    def _offset(self, gpa: int, length: int) -> int:
        if length < 0:
            raise ValueError(f"negative length {length} at guest-physical {gpa:#x}")
        for bank_gpa, size, fd_offset in self.banks:
            if bank_gpa <= gpa and gpa + length <= bank_gpa + size:
                return fd_offset + gpa - bank_gpa
        where = ", ".join(f"{g:#x}-{g + s - 1:#x}" for g, s, _ in self.banks)
        raise ValueError(f"guest-physical {gpa:#x}+{length:#x} is outside guest RAM ({where})")

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return self._mm[off : off + length]

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        off = self._offset(gpa, len(data))
        self._mm[off : off + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (release it before the guest closes)."""
        off = self._offset(gpa, length)
        return self._view[off : off + length]

    def close(self) -> None:
        self._view.release()
        try:
            self._mm.close()
        except BufferError:
            log.warning("guest RAM is still exported through a view; it stays mapped until that view goes")


class SimVcpu:
    """One vCPU of the simulated guest: one MMIO access at a time."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self._sock = sock
        # One access at a time, like a real vCPU. A flag and a parking lot
        # rather than trio.Lock: no extra scheduler round on the hot path.
        self._busy = False
        self._waiting = trio.lowlevel.ParkingLot()
        self._seq = 0
        self._request = bytearray(TRAP_REQUEST.size)
        self._reply = bytearray(TRAP_REPLY.size + 4096)

    async def read(self, addr: int, size: int) -> int:
        """Load ``size`` bytes (1, 2, 4 or 8) from guest-physical ``addr``."""
        return await self._access(TRAP_READ, addr, size, 0)

    async def write(self, addr: int, size: int, value: int) -> None:
        """Store the low ``size`` bytes of ``value`` (a 64-bit register) at ``addr``."""
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"value {value:#x} does not fit a 64-bit register")
        await self._access(TRAP_WRITE, addr, size, value)

    async def _access(self, kind: int, addr: int, size: int, value: int) -> int:
        if size not in _SIZES:
            raise ValueError(f"access size {size}: a vCPU accesses 1, 2, 4 or 8 bytes")
        if not 0 <= addr <= _U64_MAX - size + 1:
            raise ValueError(f"address {addr:#x} is not a 64-bit guest-physical address")
        sock = self._sock
        while self._busy:
            await self._waiting.park()
        self._busy = True
        try:
            seq = self._seq = (self._seq + 1) & 0xFFFFFFFF
            TRAP_REQUEST.pack_into(self._request, 0, kind, size, 0, seq, addr, value)
            while True:
                try:
                    sock.send(self._request)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                except OSError as exc:
                    raise GuestError(f"vCPU {self.index}: lost the simulator ({exc.strerror})") from None
            buf = self._reply
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise GuestError(f"vCPU {self.index}: lost the simulator ({exc.strerror})") from None
                if n == 0:
                    raise GuestError(f"vCPU {self.index}: the simulator closed its trap socket (did it exit?)")
                if n < TRAP_REPLY.size:
                    raise GuestError(f"vCPU {self.index}: short trap reply of {n} bytes")
                status, _r1, _r2, reply_seq, data = TRAP_REPLY.unpack_from(buf)
                if reply_seq != seq:
                    continue  # the answer to an access whose caller was cancelled
                if status == TRAP_OK:
                    return data
                message = bytes(buf[TRAP_REPLY.size : n]).decode("utf-8", "replace") or control.TRAP_STATUS_NAMES.get(
                    status, f"status {status}"
                )
                raise _STATUS_ERRORS.get(status, GuestError)(message)
        finally:
            self._busy = False
            if self._waiting:
                self._waiting.unpark()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


class _IrqLine:
    __slots__ = ("irq", "level", "edges", "runs", "pending", "active", "handler", "wakeup", "changed")

    def __init__(self, irq: int) -> None:
        self.irq = irq
        self.level = 0
        self.edges = 0
        self.runs = 0
        self.pending = False
        self.active = False
        self.handler: Callable[[], Awaitable[None]] | None = None
        self.wakeup: trio.Event | None = None
        self.changed = trio.Event()


class SimGuest:
    """The guest domain of a running ``xen-sim``."""

    def __init__(
        self,
        info: dict,
        control_sock,
        ram: GuestRam,
        vcpus: list[SimVcpu],
        irq_sock: socket.socket,
        nursery: trio.Nursery,
    ) -> None:
        self.domid: int = info["domid"]
        self.arch: str = info.get("arch", "arm")
        self.irq_model: str = info.get("irq_model", "xen")
        self.ram = ram
        self.vcpus = vcpus
        self._control = control_sock
        self._irq_sock = irq_sock
        self._nursery = nursery
        self._lines: dict[int, _IrqLine] = {}
        self._request_lock = trio.Lock()
        self._request_seq = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, control_path: str) -> AsyncIterator["SimGuest"]:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with sock:
            try:
                await sock.connect(control_path)
            except OSError as exc:
                raise HypervisorUnavailable(f"no Xen simulator at {control_path} ({exc.strerror or exc})") from None
            await control.trio_send_message(sock, {"op": "hello", "role": "guest", "protocol": control.PROTOCOL_VERSION})
            received = await control.trio_recv_message(sock)
            if received is None:
                raise HypervisorError("the Xen simulator closed the connection before attaching the guest")
            if received.error is not None:
                raise HypervisorError(f"unreadable reply from the Xen simulator: {received.error}")
            info, fds = received.message, received.fds
            if info.get("ok") is not True:
                control.close_fds(fds)
                raise HypervisorError(str(info.get("error", info)))
            nr_vcpus = info["vcpus"]
            if len(fds) != nr_vcpus + 2:
                control.close_fds(fds)
                raise HypervisorError(f"the simulator sent {len(fds)} fds for a {nr_vcpus}-vCPU guest (expected {nr_vcpus + 2})")
            try:
                ram = GuestRam(fds[0], info["ram"])
            finally:
                control.close_fds(fds[:1])
            socks = [socket.socket(fileno=fd) for fd in fds[1:]]
            for s in socks:
                s.setblocking(False)
            vcpus = [SimVcpu(i, s) for i, s in enumerate(socks[:-1])]
            irq_sock = socks[-1]
            try:
                async with trio.open_nursery() as nursery:
                    guest = cls(info, sock, ram, vcpus, irq_sock, nursery)
                    nursery.start_soon(guest._irq_reader)
                    yield guest
                    nursery.cancel_scope.cancel()
            finally:
                for vcpu in vcpus:
                    vcpu.close()
                trio.lowlevel.notify_closing(irq_sock)
                irq_sock.close()
                ram.close()

    # --- interrupts

    def _line(self, irq: int) -> _IrqLine:
        line = self._lines.get(irq)
        if line is None:
            line = self._lines[irq] = _IrqLine(irq)
        return line

    def on_irq(self, irq: int, handler: Callable[[], Awaitable[None]]) -> None:
        """Run ``handler`` for every edge latched on ``irq`` (including one
        latched before the handler was set). Replaces an earlier handler."""
        line = self._line(irq)
        first = line.handler is None
        line.handler = handler
        if first:
            line.wakeup = trio.Event()
            self._nursery.start_soon(self._irq_runner, line)

    def irq_level(self, irq: int) -> int:
        """The line level as the simulator last reported it."""
        line = self._lines.get(irq)
        return line.level if line is not None else 0

    def edge_count(self, irq: int) -> int:
        """Edges the vGIC latched on ``irq`` so far."""
        line = self._lines.get(irq)
        return line.edges if line is not None else 0

    def handler_runs(self, irq: int) -> int:
        """How many times the handler of ``irq`` has finished."""
        line = self._lines.get(irq)
        return line.runs if line is not None else 0

    async def wait_irq_edges(self, irq: int, count: int) -> None:
        """Wait until ``irq`` has seen at least ``count`` edges in total."""
        line = self._line(irq)
        while line.edges < count:
            await line.changed.wait()

    def _irq_record(self, irq: int, level: int, edge: int) -> None:
        line = self._line(irq)
        line.level = level
        if edge:
            line.edges += 1
            line.pending = True
            if line.wakeup is not None:
                line.wakeup.set()
        changed = line.changed
        line.changed = trio.Event()
        changed.set()

    async def _irq_reader(self) -> None:
        sock = self._irq_sock
        buf = bytearray(IRQ_RECORD.size * 512)
        unpack = IRQ_RECORD.unpack_from
        size = IRQ_RECORD.size
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                if n == 0:
                    log.warning("the simulator closed the interrupt channel")
                    return
                for off in range(0, n - n % size, size):
                    irq, level, edge, _reserved = unpack(buf, off)
                    self._irq_record(irq, level, edge)

    async def _irq_runner(self, line: _IrqLine) -> None:
        while True:
            while line.pending:
                line.pending = False  # acknowledged: pending -> active
                line.active = True
                try:
                    await line.handler()
                finally:
                    line.active = False  # EOI
                line.runs += 1
            line.wakeup = trio.Event()
            await line.wakeup.wait()

    # --- requests on the control connection: the device tree, the grant table

    async def _request(self, op: str, **fields) -> dict:
        """One guest-role request and its reply (one at a time; a reply left
        behind by a cancelled request is skipped by its seq)."""
        reply, fds = await self._request_with_fds(op, 0, **fields)
        return reply

    async def _request_with_fds(self, op: str, max_fds: int, **fields) -> tuple[dict, list[int]]:
        """:meth:`_request`, and the fds that came with a successful reply
        (the caller closes them)."""
        async with self._request_lock:
            self._request_seq += 1
            seq = self._request_seq
            try:
                await control.trio_send_message(self._control, {"op": op, "seq": seq, **fields})
                while True:
                    received = await control.trio_recv_message(self._control, max_fds=max_fds)
                    if received is None:
                        raise HypervisorError(f"{op}: the Xen simulator closed the guest's connection (did it exit?)")
                    if received.error is not None:
                        control.close_fds(received.fds)
                        raise HypervisorError(f"{op}: unreadable reply from the Xen simulator: {received.error}")
                    reply = received.message
                    if reply.get("seq") == seq:
                        break
                    control.close_fds(received.fds)
            except OSError as exc:
                raise HypervisorError(f"{op}: lost the Xen simulator ({exc.strerror or exc})") from None
        if reply.get("ok") is not True:
            control.close_fds(received.fds)
            err = control.errno_from_name(reply.get("errno"))
            suffix = f" ({errno_module.errorcode[err]})" if err is not None else ""
            raise GuestRequestError(f"{op}: {reply.get('error', reply)}{suffix}", err)
        return reply, received.fds

    async def vcpu_loop(
        self,
        plan: Sequence[tuple[int, int]],
        seconds: float,
        *,
        size: int = 4,
        one_at_a_time: bool = False,
    ) -> tuple[list[int], float]:
        """Have vCPUs run a load loop in the simulator, where Xen runs a
        vCPU (``xen.sim.vcpu_loop``): each (vCPU index, address) of
        ``plan`` loads ``size`` bytes again and again for ``seconds``, all
        at once or ``one_at_a_time``. Returns every access's latency (ns)
        and the time taken (s). A failed access raises GuestRequestError
        with its explanation."""
        ms = max(1, round(seconds * 1000))
        reply, fds = await self._request_with_fds(
            "vcpu_loop",
            1,
            vcpus=[vcpu for vcpu, _ in plan],
            addrs=[addr for _, addr in plan],
            size=size,
            ms=ms,
            one_at_a_time=one_at_a_time,
        )
        if len(fds) != 1:
            control.close_fds(fds)
            raise HypervisorError(f"vcpu_loop: the simulator sent {len(fds)} fds (expected 1, the latencies)")
        samples = array.array("Q")
        with open(fds[0], "rb") as f:
            f.seek(0)  # the simulator's write left the shared offset at the end
            data = f.read()
        samples.frombytes(data[: len(data) - len(data) % samples.itemsize])
        if len(samples) != reply["accesses"]:
            raise HypervisorError(f"vcpu_loop: {len(samples)} latencies for {reply['accesses']} accesses")
        return samples.tolist(), reply["ns"] / 1e9

    async def devices(self) -> list[VirtioMmioDevice]:
        """The virtio-mmio devices of the guest's device tree, as libxl laid
        them out (devid order)."""
        reply = await self._request("devices")
        return [VirtioMmioDevice(**d) for d in reply["devices"]]

    async def grant_access(self, gfn: int, readonly: bool = False, *, backend_domid: int = 0) -> int:
        """gnttab_grant_foreign_access(): grant frame ``gfn`` to the backend
        domain; returns the grant reference."""
        reply = await self._request("grant_access", gfn=gfn, readonly=bool(readonly), backend_domid=backend_domid)
        return reply["ref"]

    async def grant_access_seq(self, gfn: int, count: int, readonly: bool = False, *, backend_domid: int = 0) -> int:
        """Grant frames gfn .. gfn + count - 1 with consecutive references
        (gnttab_alloc_grant_reference_seq, as xen-grant-dma does for a
        multi-page buffer); returns the first reference."""
        reply = await self._request(
            "grant_access_seq", gfn=gfn, count=count, readonly=bool(readonly), backend_domid=backend_domid
        )
        return reply["ref"]

    async def end_access(self, ref: int) -> None:
        """gnttab_end_foreign_access_ref(): revoke a grant."""
        await self._request("end_access", ref=ref)

    async def grant_dma_map(self, gpa: int, length: int, *, readonly: bool = False, backend_domid: int = 0) -> int:
        """xen-grant-dma's map of a buffer at guest-physical ``gpa``: grant
        its frames with consecutive references and return the address a
        driver puts in a descriptor (:func:`grant_address` of the first
        reference and the offset in the first page)."""
        if length <= 0:
            raise ValueError(f"grant_dma_map: length must be positive, not {length}")
        first, last = gpa >> 12, (gpa + length - 1) >> 12
        ref = await self.grant_access_seq(first, last - first + 1, readonly, backend_domid=backend_domid)
        return grant_address(ref, gpa & 0xFFF)

    async def grant_dma_unmap(self, addr: int, length: int) -> None:
        """Revoke every grant :meth:`grant_dma_map` made for that buffer."""
        ref, offset = grant_ref_of(addr)
        for i in range(grant_page_count(offset, length)):
            await self.end_access(ref + i)
