"""The :class:`xen.hypervisor.Hypervisor` interface over the Xen simulator.

Every call is one blocking request/reply on the simulator's control socket
(``xen.sim.control``), the way every call on real Xen is one ioctl. An event
channel is a socketpair end that behaves like ``/dev/xen/evtchn``.
"""

from __future__ import annotations

import errno as errno_module
import logging
import mmap
import select
import socket
import struct
from collections.abc import Iterable, Sequence

from xen import abi
from xen.hypervisor import EventChannel, GuestRamRegion, Hypervisor, HypervisorError, HypervisorUnavailable, IoreqPages
from xen.sim import control
from xen.sim.control import EVTCHN_OP_NOTIFY, EVTCHN_OP_UNMASK, EVTCHN_RECORD, ProtocolError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
"""Seconds to wait for the simulator to answer a call."""


class SimHypervisorError(HypervisorError):
    """A simulated hypercall failed; ``errno`` is what Xen would return."""

    def __init__(self, message: str, errno: int | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.op = op


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

    def set_irq_level(self, irq: int, level: int) -> None:
        self._dm_op("set_irq_level", irq=irq, level=level)

    def open_event_channel(self) -> "SimEventChannel":
        reply, fds = self._call("evtchn_open")
        if len(fds) != 1:
            control.close_fds(fds)
            raise HypervisorError(f"evtchn_open: the simulator sent {len(fds)} fds instead of 1")
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        channel = SimEventChannel(self, reply["handle"], sock)
        self._channels.append(channel)
        return channel

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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        control.close_fds(self._ram_fds)
        self._ram_fds = []
        self._ram = None
        self._sock.close()

    def __enter__(self) -> "SimHypervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call(sock: socket.socket, request: dict, op: str, timeout: float | None) -> tuple[dict, list[int]]:
    """One request, its reply: (reply, fds). Raises SimHypervisorError for an
    error reply and HypervisorError when the simulator does not answer."""
    try:
        control.send_message(sock, request)
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
        sock = self._sock
        buf = self._rbuf
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return ports
            except OSError as exc:
                raise HypervisorError(f"event channel: {exc.strerror or exc}") from None
            if n == 0:
                raise HypervisorError("event channel: the Xen simulator closed it (did it exit?)")
            count = n >> 2
            unpack = self._ports.get(count)
            if unpack is None:
                unpack = self._ports[count] = struct.Struct(f"<{count}I")
            ports.extend(unpack.unpack_from(buf))

    def unmask(self, local_ports: Iterable[int]) -> None:
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

    def notify(self, local_port: int) -> None:
        record = self._notify_records.get(local_port)
        if record is None:
            record = self._notify_records[local_port] = EVTCHN_RECORD.pack(EVTCHN_OP_NOTIFY, local_port)
        self._send(record)

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


__all__ = ["CALL_TIMEOUT", "SimEventChannel", "SimHypervisor", "SimHypervisorError"]
