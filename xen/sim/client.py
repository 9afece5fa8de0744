"""The :class:`xen.hypervisor.Hypervisor` interface over the Xen simulator.

Every call is one blocking request/reply on the simulator's control socket
(``xen.sim.control``), the way every call on real Xen is one ioctl. An event
channel is a socketpair end that behaves like ``/dev/xen/evtchn``.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import logging
import mmap
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence

from xen import abi
from xen.hypervisor import (
    XEN_PAGE_SIZE,
    EventChannel,
    FastPathUnsupported,
    GuestMapping,
    GuestMemoryFault,
    GuestRamRegion,
    Hypervisor,
    HypervisorError,
    HypervisorUnavailable,
    IoreqPages,
)
from xen.sim import control
from xen.sim.control import (
    EVTCHN_OP_NOTIFY,
    EVTCHN_OP_UNMASK,
    EVTCHN_RECORD,
    IRQ_LEVEL_REPLY,
    IRQ_LEVEL_REQUEST,
    ProtocolError,
)
from xen.xenstore import XenStore, XenStoreError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
"""Seconds to wait for the simulator to answer a call."""


class SimHypervisorError(HypervisorError):
    """A simulated hypercall failed; ``errno`` is what Xen would return."""

    def __init__(self, message: str, errno: int | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.op = op


class SimFastPathUnsupported(SimHypervisorError, FastPathUnsupported):
    """The simulated dom0 kernel has no privcmd ioeventfd/irqfd (ENOTTY or
    EOPNOTSUPP, as Linux before 6.7 or without CONFIG_XEN_PRIVCMD_EVENTFD)."""


class SimHypervisor(Hypervisor):
    """One guest domain of a running ``xen-sim``, seen from its device model."""

    def __init__(self, sock: socket.socket, control_path: str, domid: int, info: dict) -> None:
        self._sock = sock
        self.control_path = control_path
        self.domid = domid
        self.arch: str = info.get("arch", "arm")
        self._seq = 0
        self._buffered: set[int] = set()
        self._ram: list[GuestRamRegion] | None = None
        self._ram_fds: list[int] = []
        self._channels: list[SimEventChannel] = []
        # id(ioreq page mmap) -> (that mmap, its server id): how ioeventfd()
        # names the server of the pages it is given, as privcmd does by address
        self._ioreq_maps: dict[int, tuple[mmap.mmap, int]] = {}
        self.kernel_kicks = 0
        """ioeventfds this connection registered (and did not deassign):
        while any is, an unmask waits for the simulator (SimEventChannel)."""
        self._xenstores: list[SimXenStore] = []
        self._irq_channel: socket.socket | None | bool = None  # False: the simulator has none
        self._closed = False

    @classmethod
    def connect(cls, control_path: str, domid: int, *, timeout: float = CALL_TIMEOUT) -> "SimHypervisor":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(control_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError) as exc:
            sock.close()
            raise HypervisorUnavailable(f"no Xen simulator at {control_path} ({exc.strerror})") from None
        except OSError as exc:
            sock.close()
            raise HypervisorUnavailable(f"no Xen simulator at {control_path} ({exc.strerror or exc})") from None
        try:
            reply, fds = _call(sock, {"op": "hello", "role": "dm", "domid": domid, "seq": 0}, "hello", timeout)
        except BaseException:
            sock.close()
            raise
        control.close_fds(fds)
        return cls(sock, control_path, domid, reply)

    # --- plumbing

    def _call(self, op: str, **fields) -> tuple[dict, list[int]]:
        if self._closed:
            raise HypervisorError(f"{op}: the simulator connection is closed")
        self._seq += 1
        request = {"op": op, "seq": self._seq, **fields}
        return _call(self._sock, request, op, self._sock.gettimeout())

    def _dm_op(self, op: str, **fields) -> dict:
        reply, fds = self._call(op, domid=self.domid, **fields)
        control.close_fds(fds)
        return reply

    # --- Hypervisor

    def nr_vcpus(self) -> int:
        return self._dm_op("nr_vcpus")["vcpus"]

    def create_ioreq_server(self, *, buffered: bool = False) -> int:
        handle = abi.HVM_IOREQSRV_BUFIOREQ_ATOMIC if buffered else abi.HVM_IOREQSRV_BUFIOREQ_OFF
        server_id = self._dm_op("create_ioreq_server", handle_bufioreq=handle)["id"]
        if buffered:
            self._buffered.add(server_id)
        return server_id

    def get_ioreq_server_info(self, server_id: int) -> int | None:
        """XEN_DMOP_get_ioreq_server_info without gfns: the buffered-ioreq
        event channel port (guest side), or None."""
        return self._dm_op("get_ioreq_server_info", id=server_id)["bufioreq_port"]

    def _map_frame(self, server_id: int, frame: int) -> mmap.mmap:
        reply, fds = self._call(
            "map_resource",
            domid=self.domid,
            type=abi.XENMEM_RESOURCE_IOREQ_SERVER,
            id=server_id,
            frame=frame,
            nr_frames=1,
        )
        try:
            if len(fds) != 1:
                raise HypervisorError(f"map_resource: the simulator sent {len(fds)} fds instead of 1")
            return mmap.mmap(
                fds[0], reply["length"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=reply["offset"]
            )
        finally:
            control.close_fds(fds)

    def map_ioreq_pages(self, server_id: int) -> IoreqPages:
        ioreq = self._map_frame(server_id, abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ)
        buffered = None
        if server_id in self._buffered:
            buffered = self._map_frame(server_id, abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ)
        self._ioreq_maps[id(ioreq)] = (ioreq, server_id)
        return IoreqPages(ioreq=ioreq, buffered=buffered)

    def set_ioreq_server_state(self, server_id: int, enabled: bool) -> None:
        self._dm_op("set_ioreq_server_state", id=server_id, enabled=bool(enabled))

    def map_mmio_range(self, server_id: int, start: int, end: int) -> None:
        self._dm_op("map_io_range_to_ioreq_server", id=server_id, type=abi.XEN_DMOP_IO_RANGE_MEMORY, start=start, end=end)

    def unmap_mmio_range(self, server_id: int, start: int, end: int) -> None:
        self._dm_op(
            "unmap_io_range_from_ioreq_server", id=server_id, type=abi.XEN_DMOP_IO_RANGE_MEMORY, start=start, end=end
        )

    def destroy_ioreq_server(self, server_id: int) -> None:
        self._dm_op("destroy_ioreq_server", id=server_id)
        self._buffered.discard(server_id)
        for key, (_ioreq, mapped_id) in list(self._ioreq_maps.items()):
            if mapped_id == server_id:
                del self._ioreq_maps[key]

    def set_irq_level(self, irq: int, level: int) -> None:
        channel = self._irq_channel
        if channel is None:
            channel = self._open_irq_channel()
        if channel is False:
            self._dm_op("set_irq_level", irq=irq, level=level)
            return
        try:
            channel.send(IRQ_LEVEL_REQUEST.pack(irq, level))
            reply = channel.recv(IRQ_LEVEL_REPLY.size + 1)
        except TimeoutError:
            raise HypervisorError(f"set_irq_level: the Xen simulator did not answer within "
                                  f"{channel.gettimeout():g} s") from None
        except OSError as exc:
            raise HypervisorError(f"set_irq_level: lost the Xen simulator ({exc.strerror or exc})") from None
        if len(reply) != IRQ_LEVEL_REPLY.size:
            raise HypervisorError(f"set_irq_level: the Xen simulator's irq channel answered {len(reply)} bytes")
        if IRQ_LEVEL_REPLY.unpack(reply)[0]:
            self._dm_op("set_irq_level", irq=irq, level=level)  # refused: the control op says why

    def _open_irq_channel(self) -> socket.socket | bool:
        """The simulator's channel for set_irq_level (a hypercall on Xen,
        not worth a JSON control request); False where it has none."""
        try:
            _reply, sock = self._open_channel("irq_channel_open")
        except SimHypervisorError as exc:
            if exc.errno not in (errno_module.EINVAL, errno_module.EBADMSG):  # an older simulator
                raise
            self._irq_channel = False
            return False
        sock.settimeout(self._sock.gettimeout())
        self._irq_channel = sock
        return sock

    def _open_channel(self, op: str) -> tuple[dict, socket.socket]:
        """An op whose reply hands over one end of a socketpair: (reply,
        that end, nonblocking)."""
        reply, fds = self._call(op)
        if len(fds) != 1:
            control.close_fds(fds)
            raise HypervisorError(f"{op}: the simulator sent {len(fds)} fds instead of 1")
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        return reply, sock

    def evtchn_sync(self) -> None:
        """Wait until the simulator has acted on every record sent on this
        connection's event-channel devices (and run what they triggered)."""
        _reply, fds = self._call("evtchn_sync")
        control.close_fds(fds)

    def open_event_channel(self) -> "SimEventChannel":
        reply, sock = self._open_channel("evtchn_open")
        channel = SimEventChannel(self, reply["handle"], sock)
        self._channels.append(channel)
        return channel

    # --- the kernel fast path: privcmd's ioeventfd and irqfd ioctls

    def ioeventfd(
        self, pages: IoreqPages, ports: Sequence[int], *, base: int, vq: int, fd: int, assign: bool = True
    ) -> None:
        self.privcmd_ioeventfd(pages, ports, addr=base, addr_len=4, vq=vq, fd=fd, flags=0 if assign else 1)

    def privcmd_ioeventfd(
        self, pages: IoreqPages, ports: Sequence[int], *, addr: int, addr_len: int, vq: int, fd: int, flags: int
    ) -> None:
        """IOCTL_PRIVCMD_IOEVENTFD with every field of struct privcmd_ioeventfd
        (``ioeventfd`` is the QueueNotify case: addr_len 4)."""
        op = "privcmd_ioeventfd"
        entry = self._ioreq_maps.get(id(pages.ioreq))
        if entry is None or entry[0] is not pages.ioreq or pages.ioreq.closed:
            # privcmd finds no mapping (vma) of an ioreq page at that address
            raise SimHypervisorError(
                f"{op}: that ioreq page was not mapped by map_ioreq_pages() on this connection (EFAULT)",
                errno_module.EFAULT,
                op,
            )
        self._privcmd_call(op, fd, id=entry[1], ports=list(ports), addr=addr, addr_len=addr_len, vq=vq, flags=flags)
        self.kernel_kicks += -1 if flags & 1 else 1

    def irqfd(self, *, irq: int, fd: int, assign: bool = True) -> None:
        self._privcmd_call("privcmd_irqfd", fd, irq=irq, flags=0 if assign else 1)

    def _privcmd_call(self, op: str, fd: int, **fields) -> None:
        """One privcmd eventfd ioctl with ``fd`` sent along (SCM_RIGHTS).
        ENOTTY or EOPNOTSUPP (no such ioctl in this dom0 kernel) raise
        FastPathUnsupported."""
        if self._closed:
            raise HypervisorError(f"{op}: the simulator connection is closed")
        try:
            os.fstat(fd)
        except (OSError, TypeError, ValueError, OverflowError):
            raise SimHypervisorError(
                f"{op}: fd {fd!r} is not an open file descriptor (EBADF)", errno_module.EBADF, op
            ) from None
        self._seq += 1
        request = {"op": op, "seq": self._seq, "domid": self.domid, **fields}
        try:
            _reply, fds = _call(self._sock, request, op, self._sock.gettimeout(), [fd])
        except SimHypervisorError as exc:
            if exc.errno in (errno_module.ENOTTY, errno_module.EOPNOTSUPP):
                raise SimFastPathUnsupported(str(exc), exc.errno, op) from None
            raise
        control.close_fds(fds)

    def guest_ram(self) -> Sequence[GuestRamRegion]:
        if self._ram is None:
            reply, fds = self._call("guest_ram", domid=self.domid)
            if len(fds) != 1:
                control.close_fds(fds)
                raise HypervisorError(f"guest_ram: the simulator sent {len(fds)} fds instead of 1")
            self._ram_fds = fds
            self._ram = [
                GuestRamRegion(gpa=r["gpa"], size=r["size"], fd=fds[0], fd_offset=r["fd_offset"]) for r in reply["regions"]
            ]
        return list(self._ram)

    # --- guest pages, grants, xenstore (the simulator's toolstack ops)

    def guest_ram_layout(self) -> list[tuple[int, int]]:
        reply, fds = self._call("guest_ram", domid=self.domid)
        control.close_fds(fds)  # only the layout is wanted here
        return sorted((r["gpa"], r["size"]) for r in reply["regions"])

    def _guest_memory_call(self, op: str, **fields) -> tuple[dict, int]:
        """A mapping op: (reply, the RAM memfd, which the caller closes).
        What Xen or gntdev refuses becomes a GuestMemoryFault."""
        try:
            reply, fds = self._call(op, domid=self.domid, **fields)
        except SimHypervisorError as exc:
            if exc.errno in (errno_module.EINVAL, errno_module.EPERM):
                raise SimGuestMemoryFault(str(exc), exc.errno, op) from None
            raise
        if len(fds) != 1:
            control.close_fds(fds)
            raise HypervisorError(f"{op}: the simulator sent {len(fds)} fds instead of 1")
        return reply, fds[0]

    def map_guest_pages(self, gfn: int, count: int) -> "SimGuestMapping":
        if count < 1:
            raise ValueError(f"map_guest_pages: count must be at least 1, not {count}")
        if gfn < 0:
            raise SimGuestMemoryFault(f"map_foreign: gfn {gfn} is negative", errno_module.EINVAL, "map_foreign")
        reply, fd = self._guest_memory_call("map_foreign", gfn=gfn, count=count)
        try:
            return SimGuestMapping.map(fd, reply["offset"], count * XEN_PAGE_SIZE)
        finally:
            os.close(fd)

    def map_grant_refs(self, refs: Sequence[int]) -> "SimGrantMapping":
        refs = list(refs)
        if not refs:
            raise ValueError("map_grant_refs: no grant references")
        for ref in refs:
            if type(ref) is not int or not 0 <= ref <= 0xFFFFFFFF:
                raise SimGuestMemoryFault(f"map_grant_refs: {ref!r} is not a grant reference", errno_module.EINVAL, "map_grant_refs")
        offsets: list[int] = []
        fd = -1
        try:
            for start in range(0, len(refs), control.MAX_GRANT_REFS_PER_MAP):
                reply, chunk_fd = self._guest_memory_call(
                    "map_grant_refs", refs=refs[start : start + control.MAX_GRANT_REFS_PER_MAP]
                )
                if fd < 0:
                    fd = chunk_fd
                else:
                    os.close(chunk_fd)  # the same RAM memfd again
                offsets.extend(reply["offsets"])
            return SimGrantMapping.map(fd, offsets)
        finally:
            if fd >= 0:
                os.close(fd)

    def stats(self) -> dict[str, int]:
        """The simulator's counters of mapped guest memory and grants."""
        reply, fds = self._call("stats")
        control.close_fds(fds)
        return {k: v for k, v in reply.items() if k not in ("ok", "seq")}

    def xenstore(self) -> "SimXenStore":
        reply, sock = self._open_channel("xs_open")
        store = SimXenStore(self, reply["handle"], sock)
        self._xenstores.append(store)
        return store

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        for store in list(self._xenstores):
            store.close()
        control.close_fds(self._ram_fds)
        self._ram_fds = []
        self._ram = None
        self._ioreq_maps.clear()
        if self._irq_channel:
            self._irq_channel.close()
        self._irq_channel = None
        self._sock.close()

    def __enter__(self) -> "SimHypervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _waiting_messages(sock: socket.socket, buf: bytearray, what: str, error: type[Exception]) -> Iterator[int]:
    """Receive, into ``buf``, each message already waiting on a nonblocking
    SEQPACKET socket, yielding its length; stop when none is left."""
    while True:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            raise error(f"{what}: {exc.strerror or exc}") from None
        if n == 0:
            raise error(f"{what}: the Xen simulator closed it (did it exit?)")
        yield n


def _call(
    sock: socket.socket, request: dict, op: str, timeout: float | None, fds: Sequence[int] = ()
) -> tuple[dict, list[int]]:
    """One request (with ``fds`` attached), its reply: (reply, fds). Raises
    SimHypervisorError for an error reply and HypervisorError when the
    simulator does not answer."""
    try:
        control.send_message(sock, request, fds)
        while True:
            received = control.recv_message(sock)
            if received is None:
                raise HypervisorError(f"{op}: the Xen simulator closed the control connection (did it exit?)")
            if received.error is not None:
                raise HypervisorError(f"{op}: unreadable reply from the Xen simulator: {received.error}")
            reply = received.message
            if reply.get("seq", request.get("seq")) != request.get("seq"):
                control.close_fds(received.fds)  # the late answer to a call that timed out
                continue
            break
    except TimeoutError:
        raise HypervisorError(f"{op}: the Xen simulator did not answer within {timeout:g} s") from None
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise HypervisorError(f"{op}: lost the Xen simulator ({exc.strerror})") from None
    except ProtocolError as exc:
        raise HypervisorError(f"{op}: {exc}") from None
    if reply.get("ok") is not True:
        control.close_fds(received.fds)
        message = reply.get("error")
        if type(message) is not str:
            message = f"malformed error reply {reply!r}"
        err = control.errno_from_name(reply.get("errno"))
        text = message if op == "hello" else f"{op}: {message}"
        if err is not None and op != "hello":
            text = f"{text} ({errno_module.errorcode[err]})"
        raise SimHypervisorError(text, err, op)
    return reply, received.fds


class SimEventChannel(EventChannel):
    """/dev/xen/evtchn of the simulator: one nonblocking SOCK_SEQPACKET end."""

    def __init__(self, hypervisor: SimHypervisor, handle: int, sock: socket.socket) -> None:
        self._hv = hypervisor
        self.handle = handle
        self._sock = sock
        self._fd = sock.fileno()
        self._rbuf = bytearray(4096)
        self._wbuf = bytearray(EVTCHN_RECORD.size * 64)
        self._ports: dict[int, struct.Struct] = {}
        self._notify_records: dict[int, bytes] = {}
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        reply, fds = self._hv._call(
            "evtchn_bind_interdomain", handle=self.handle, remote_domid=remote_domid, remote_port=remote_port
        )
        control.close_fds(fds)
        return reply["port"]

    def unbind(self, local_port: int) -> None:
        reply, fds = self._hv._call("evtchn_unbind", handle=self.handle, port=local_port)
        control.close_fds(fds)
        self._notify_records.pop(local_port, None)

    def read_pending(self) -> list[int]:
        ports: list[int] = []
        while True:
            some = self.read_some()
            if not some:
                return ports
            ports += some

    def read_some(self) -> list[int]:
        try:
            n = self._sock.recv_into(self._rbuf)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise HypervisorError(f"event channel: {exc.strerror or exc}") from None
        if n == 0:
            raise HypervisorError("event channel: the Xen simulator closed it (did it exit?)")
        count = n >> 2
        unpack = self._ports.get(count)
        if unpack is None:
            unpack = self._ports[count] = struct.Struct(f"<{count}I")
        return list(unpack.unpack_from(self._rbuf))

    def unmask(self, local_ports: Iterable[int]) -> None:
        """Unmask the ports. An event that fired while one was masked is
        delivered now, and runs the kernel's ioeventfd handler: in Linux
        that happens in the upcall the unmask causes, before write()
        returns, so a device model that looks at the slots next finds what
        the handler left. Where this connection has ioeventfds, the unmask
        therefore waits until the simulator has acted on it (a control
        round trip); without, it is one message, not awaited."""
        buf = self._wbuf
        size = EVTCHN_RECORD.size
        pack = EVTCHN_RECORD.pack_into
        off = 0
        for port in local_ports:
            if off + size > len(buf):
                buf.extend(bytes(len(buf)))
            pack(buf, off, EVTCHN_OP_UNMASK, port)
            off += size
        if off:
            self._send(memoryview(buf)[:off])
            if self._hv.kernel_kicks > 0:
                self._hv.evtchn_sync()

    def notify(self, local_port: int) -> None:
        record = self._notify_records.get(local_port)
        if record is None:
            record = self._notify_records[local_port] = EVTCHN_RECORD.pack(EVTCHN_OP_NOTIFY, local_port)
        self._send(record)

    def unmask_and_notify(self, unmask_ports: Sequence[int], notify_ports: Sequence[int]) -> None:
        """``unmask(unmask_ports)``, then ``notify`` each of ``notify_ports``,
        in one message (the simulator acts on its records in order): one
        system call and one wake-up of the simulator instead of one each."""
        size = EVTCHN_RECORD.size
        need = size * (len(unmask_ports) + len(notify_ports))
        buf = self._wbuf
        if need > len(buf):
            buf.extend(bytes(need - len(buf)))
        pack = EVTCHN_RECORD.pack_into
        off = 0
        for port in unmask_ports:
            pack(buf, off, EVTCHN_OP_UNMASK, port)
            off += size
        for port in notify_ports:
            pack(buf, off, EVTCHN_OP_NOTIFY, port)
            off += size
        if off:
            self._send(memoryview(buf)[:off])

    def _send(self, data) -> None:
        if self._closed:
            raise HypervisorError("event channel is closed")
        sock = self._sock
        while True:
            try:
                sock.send(data)
                return
            except BlockingIOError:
                ready = select.select([], [sock], [], CALL_TIMEOUT)[1]
                if not ready:
                    raise HypervisorError(
                        f"event channel: the Xen simulator took no records for {CALL_TIMEOUT:g} s"
                    ) from None
            except OSError as exc:
                raise HypervisorError(f"event channel: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()

    def __enter__(self) -> "SimEventChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- guest pages, grants, xenstore ---------------------------------------------


class SimGuestMemoryFault(GuestMemoryFault, SimHypervisorError):
    """The simulator refused a foreign or grant mapping (``errno`` says how:
    EINVAL for a frame that is not RAM or a reference that is not an active
    grant to us, EPERM for a read-only grant)."""


class SimGuestMapping(GuestMapping):
    """Guest frames contiguous in the simulator's RAM memfd, mmapped in one
    piece (the foreign mapping of map_guest_pages)."""

    def __init__(self, mm: mmap.mmap, view: memoryview) -> None:
        self._mm: mmap.mmap | None = mm
        self.view = view

    @classmethod
    def map(cls, fd: int, offset: int, length: int) -> "SimGuestMapping":
        # mmap offsets must be host-page aligned; a host page bigger than
        # Xen's 4 KiB maps a little more around the frames than asked.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        lead = offset - start
        mm = mmap.mmap(fd, lead + length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        with memoryview(mm) as whole:
            view = whole[lead : lead + length]
        return cls(mm, view)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            self.view.release()
            mm.close()
        except BufferError:
            # The caller still holds a slice of the view: the pages stay
            # mapped until it goes (unmapping now would fault on it).
            log.debug("guest mapping still exported; unmapped when the last view goes")

    def __enter__(self) -> "SimGuestMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MAP_FIXED = 0x10  # <asm-generic/mman-common.h>; the mmap module does not export it
_PROT_NONE = 0
_libc = None


def _libc_calls():
    """libc's mmap and mprotect through ctypes (loaded on first use)."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn = getattr(libc, "mmap64", None) or libc.mmap
        mmap_fn.restype = ctypes.c_void_p
        mmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        libc.mprotect.restype = ctypes.c_int
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = (mmap_fn, libc.mprotect)
    return _libc


class SimGrantMapping(SimGuestMapping):
    """Granted pages, wherever they sit in the RAM memfd, as one contiguous
    view (what gntdev gives): a reservation of n pages, then each run of
    pages consecutive in the memfd mapped MAP_FIXED over its part of it.

    The reservation is a Python anonymous mmap turned PROT_NONE, so that
    closing it unmaps the whole region at once, and so that mmap's own
    export tracking refuses to unmap while a slice of the view is alive."""

    @classmethod
    def map(cls, fd: int, offsets: Sequence[int]) -> "SimGrantMapping":
        page = XEN_PAGE_SIZE
        if mmap.PAGESIZE != page:
            raise HypervisorError(
                f"map_grant_refs: mapping 4 KiB grants one by one needs 4 KiB host pages (this host has {mmap.PAGESIZE})"
            )
        n = len(offsets)
        mmap_fn, mprotect = _libc_calls()
        mm = mmap.mmap(-1, n * page, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            base = ctypes.addressof(anchor)
            del anchor  # drops its export of mm
            if mprotect(base, n * page, _PROT_NONE) != 0:
                err = ctypes.get_errno()
                raise HypervisorError(f"map_grant_refs: mprotect of the reservation: {os.strerror(err)}")
            i = 0
            while i < n:
                j = i + 1
                while j < n and offsets[j] == offsets[j - 1] + page:
                    j += 1
                want = base + i * page
                got = mmap_fn(
                    want, (j - i) * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, offsets[i]
                )
                if got != want:
                    err = ctypes.get_errno()
                    raise HypervisorError(f"map_grant_refs: mmap of {j - i} pages at offset {offsets[i]:#x}: {os.strerror(err)}")
                i = j
        except BaseException:
            mm.close()
            raise
        return cls(mm, memoryview(mm))


class SimXenStoreError(XenStoreError):
    """A xenstore request the simulator refused; ``errno`` is xenstored's."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class SimXenStore(XenStore):
    """One xenstore handle of the simulator: requests on the control
    connection, watch events on a socketpair end of their own."""

    def __init__(self, hypervisor: SimHypervisor, handle: int, sock: socket.socket) -> None:
        self._hv = hypervisor
        self.handle = handle
        self._sock = sock
        self._rbuf = bytearray(control.MAX_MESSAGE_SIZE)
        self._closed = False

    def _request(self, op: str, **fields) -> dict:
        if self._closed:
            raise SimXenStoreError(f"{op}: the xenstore handle is closed", errno_module.EBADF)
        try:
            reply, fds = self._hv._call(op, handle=self.handle, **fields)
        except HypervisorError as exc:
            raise SimXenStoreError(str(exc), getattr(exc, "errno", None)) from None
        control.close_fds(fds)
        return reply

    def read(self, path: str) -> str | None:
        try:
            return self._request("xs_read", path=path)["value"]
        except SimXenStoreError as exc:
            if exc.errno == errno_module.ENOENT:
                return None
            raise

    def write(self, path: str, value: str) -> None:
        self._request("xs_write", path=path, value=value)

    def directory(self, path: str) -> list[str] | None:
        try:
            return self._request("xs_directory", path=path)["names"]
        except SimXenStoreError as exc:
            if exc.errno == errno_module.ENOENT:
                return None
            raise

    def remove(self, path: str) -> None:
        try:
            self._request("xs_rm", path=path)
        except SimXenStoreError as exc:
            if exc.errno != errno_module.ENOENT:
                raise

    def watch(self, path: str, token: str) -> None:
        self._request("xs_watch", path=path, token=token)

    def unwatch(self, path: str, token: str) -> None:
        self._request("xs_unwatch", path=path, token=token)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_watches(self) -> list[tuple[str, str]]:
        if self._closed:
            raise SimXenStoreError("the xenstore handle is closed", errno_module.EBADF)
        events: list[tuple[str, str]] = []
        buf = self._rbuf
        for n in _waiting_messages(self._sock, buf, "xenstore watches", SimXenStoreError):
            try:
                events.append(control.decode_watch_event(buf[:n]))
            except ProtocolError as exc:
                raise SimXenStoreError(str(exc)) from None
        return events

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        try:
            self._hv._xenstores.remove(self)
        except ValueError:
            pass


__all__ = [
    "CALL_TIMEOUT",
    "SimEventChannel",
    "SimFastPathUnsupported",
    "SimGrantMapping",
    "SimGuestMapping",
    "SimGuestMemoryFault",
    "SimHypervisor",
    "SimHypervisorError",
    "SimXenStore",
    "SimXenStoreError",
]
