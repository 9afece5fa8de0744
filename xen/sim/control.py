"""The Xen simulator's wire formats.

Four channels connect the simulator (``xen.sim.hypervisor``) to the processes
around it, all UNIX ``SOCK_SEQPACKET`` sockets so every message keeps its
boundaries:

1. The control socket (the simulator listens on ``--control PATH``). Each
   message is one JSON object in UTF-8; file descriptors ride along as
   ``SCM_RIGHTS``. Requests are ``{"op": NAME, ...}`` with an optional
   integer ``"seq"`` that the reply echoes; replies are ``{"ok": true, ...}``
   or ``{"ok": false, "error": "one clear line", "errno": "EINVAL"}``. The
   first request on a connection is ``hello`` and picks the role: ``"dm"``
   (a device model in dom0) or ``"guest"`` (the simulated domU). Every
   request is validated against :data:`REQUESTS` before it is acted on.

2. An event-channel device (op ``evtchn_open`` hands the client one end of
   a socketpair): the model of ``/dev/xen/evtchn``. Simulator -> client: a
   message of one or more little-endian u32 *local* ports that became
   pending (what ``read()`` returns on the real device). Client ->
   simulator: a message of one or more 8-byte records ``(u32 op, u32
   port)``, :data:`EVTCHN_OP_UNMASK` or :data:`EVTCHN_OP_NOTIFY` (the real
   device's ``write()`` and ``IOCTL_EVTCHN_NOTIFY``).

3. A vCPU trap socket (one per vCPU, handed to the guest at ``hello``): the
   guest's MMIO accesses. Request :data:`TRAP_REQUEST` (24 bytes), reply
   :data:`TRAP_REPLY` (16 bytes, then an optional UTF-8 explanation when the
   status is not :data:`TRAP_OK`).

4. The guest's interrupt channel (handed to the guest at ``hello``):
   records of :data:`IRQ_RECORD` (8 bytes each, one or more per message).

The JSON codec and the validation are pure; the send/receive helpers come in
a blocking flavour (plain ``socket``) and a trio flavour.
"""

from __future__ import annotations

import array
import errno as errno_module
import json
import os
import socket
import struct
from collections.abc import Mapping, Sequence

import attrs

PROTOCOL_VERSION = 1

MAX_MESSAGE_SIZE = 65536
"""Largest control message, in bytes (JSON text)."""

MAX_FDS = 253
"""The kernel's SCM_MAX_FD: most descriptors one message can carry."""

_FD_SIZE = array.array("i").itemsize


class ProtocolError(Exception):
    """A control message that breaks the protocol (the text says how)."""


# --- binary formats of the other channels ------------------------------

EVTCHN_PORT = struct.Struct("<I")
"""One pending local port, simulator -> client."""

EVTCHN_RECORD = struct.Struct("<II")
"""One (op, port) record, client -> simulator."""

EVTCHN_OP_UNMASK = 1
EVTCHN_OP_NOTIFY = 2

TRAP_REQUEST = struct.Struct("<BBHIQQ")
"""Guest -> simulator: u8 kind, u8 size, u16 reserved (0), u32 seq,
u64 guest-physical address, u64 data (the value written; 0 for a read)."""

TRAP_REPLY = struct.Struct("<BBHIQ")
"""Simulator -> guest: u8 status, u8 reserved, u16 reserved, u32 seq (that
of the request), u64 data (the value read, masked to the access size).
Followed by a UTF-8 explanation when status != TRAP_OK."""

TRAP_READ = 1
TRAP_WRITE = 2

TRAP_OK = 0
TRAP_DATA_ABORT = 1  # no ioreq server claims the address (Xen injects a data abort)
TRAP_VCPU_HUNG = 2  # the device model never completed the ioreq (watchdog)
TRAP_DM_GONE = 3  # the ioreq server went away while the vCPU waited on it
TRAP_DOMAIN_CRASHED = 4  # Xen would have crashed the domain (e.g. a state going backwards)
TRAP_BAD_REQUEST = 5  # the trap message itself is malformed

TRAP_STATUS_NAMES = {
    TRAP_OK: "ok",
    TRAP_DATA_ABORT: "data abort",
    TRAP_VCPU_HUNG: "vcpu hung",
    TRAP_DM_GONE: "device model gone",
    TRAP_DOMAIN_CRASHED: "domain crashed",
    TRAP_BAD_REQUEST: "bad request",
}

IRQ_RECORD = struct.Struct("<IBBH")
"""Simulator -> guest: u32 irq, u8 line level (0/1), u8 edge (1 = the vGIC
latched the interrupt pending: run the handler), u16 reserved."""


# --- control requests ---------------------------------------------------

U8 = (0, 0xFF)
U16 = (0, 0xFFFF)
U32 = (0, 0xFFFFFFFF)
U64 = (0, 0xFFFFFFFFFFFFFFFF)


@attrs.frozen(slots=True)
class Field:
    """One request field: its JSON type and, for integers, its range."""

    kind: type  # int, bool or str
    bounds: tuple[int, int] | None = None
    choices: tuple[str, ...] | None = None
    required: bool = True

    def check(self, op: str, name: str, value: object) -> None:
        kind = self.kind
        # bool is an int in Python and int is not a bool: check exactly.
        if kind is int:
            if type(value) is not int:
                raise ProtocolError(f"{op}: field {name!r} must be an integer, not {_json_type(value)}")
            lo, hi = self.bounds or U64
            if not lo <= value <= hi:
                raise ProtocolError(f"{op}: field {name!r} = {value} is out of range [{lo}, {hi}]")
        elif kind is bool:
            if type(value) is not bool:
                raise ProtocolError(f"{op}: field {name!r} must be true or false, not {_json_type(value)}")
        elif kind is str:
            if type(value) is not str:
                raise ProtocolError(f"{op}: field {name!r} must be a string, not {_json_type(value)}")
            if self.choices is not None and value not in self.choices:
                raise ProtocolError(f"{op}: field {name!r} = {value!r} is not one of {', '.join(self.choices)}")


DOMID = Field(int, U16)
SERVER_ID = Field(int, U16)  # ioservid_t is a u16

REQUESTS: dict[str, dict[str, Field]] = {
    "hello": {
        "role": Field(str, choices=("dm", "guest")),
        "domid": Field(int, U16, required=False),
        "protocol": Field(int, U32, required=False),
    },
    # dm_ops (xen/include/public/hvm/dm_op.h); every one names its domain.
    "nr_vcpus": {"domid": DOMID},
    "create_ioreq_server": {"domid": DOMID, "handle_bufioreq": Field(int, U8)},
    "get_ioreq_server_info": {"domid": DOMID, "id": SERVER_ID},
    "map_io_range_to_ioreq_server": {
        "domid": DOMID,
        "id": SERVER_ID,
        "type": Field(int, U32),
        "start": Field(int, U64),
        "end": Field(int, U64),
    },
    "unmap_io_range_from_ioreq_server": {
        "domid": DOMID,
        "id": SERVER_ID,
        "type": Field(int, U32),
        "start": Field(int, U64),
        "end": Field(int, U64),
    },
    "set_ioreq_server_state": {"domid": DOMID, "id": SERVER_ID, "enabled": Field(bool)},
    "destroy_ioreq_server": {"domid": DOMID, "id": SERVER_ID},
    "set_irq_level": {"domid": DOMID, "irq": Field(int, U32), "level": Field(int, U8)},
    # XENMEM_acquire_resource: replies with one fd and the byte range in it.
    "map_resource": {
        "domid": DOMID,
        "type": Field(int, U32),
        "id": Field(int, U32),
        "frame": Field(int, U64),
        "nr_frames": Field(int, U64),
    },
    # /dev/xen/evtchn: open replies with one fd (the device) and its handle.
    "evtchn_open": {},
    "evtchn_bind_interdomain": {"handle": Field(int, U32), "remote_domid": DOMID, "remote_port": Field(int, U32)},
    "evtchn_unbind": {"handle": Field(int, U32), "port": Field(int, U32)},
    # The simulator's own: guest RAM as a file (replies with the RAM memfd).
    "guest_ram": {"domid": DOMID},
}

_COMMON_FIELDS = {"op", "seq"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def encode_message(message: Mapping[str, object]) -> bytes:
    """One control message as bytes."""
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit")
    return data


def decode_message(data: bytes) -> dict:
    """Parse one control message; anything but a JSON object is an error."""
    if not data:
        raise ProtocolError("empty message")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ProtocolError(f"message is not JSON ({exc})") from None
    if type(message) is not dict:
        raise ProtocolError(f"message must be a JSON object, not {_json_type(message)}")
    return message


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def validate_request(message: Mapping[str, object]) -> tuple[str, dict]:
    """Check a decoded request against :data:`REQUESTS`; returns the op and
    its fields (without ``op``/``seq``). Unknown ops, missing or unknown
    fields and wrong types all raise :class:`ProtocolError`."""
    op = message.get("op")
    if op is None:
        raise ProtocolError("request has no 'op'")
    if type(op) is not str:
        raise ProtocolError(f"'op' must be a string, not {_json_type(op)}")
    spec = REQUESTS.get(op)
    if spec is None:
        raise ProtocolError(f"unknown op {op[:64]!r}")
    seq = message.get("seq")
    if seq is not None:
        Field(int, U64).check(op, "seq", seq)
    unknown = [name for name in message if name not in spec and name not in _COMMON_FIELDS]
    if unknown:
        raise ProtocolError(f"{op}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr(n[:64]) for n in unknown)}")
    args = {}
    for name, field in spec.items():
        if name not in message:
            if field.required:
                raise ProtocolError(f"{op}: missing field {name!r}")
            continue
        field.check(op, name, message[name])
        args[name] = message[name]
    return op, args


def ok_reply(**fields: object) -> dict:
    return {"ok": True, **fields}


def error_reply(message: str, errno: int = errno_module.EINVAL) -> dict:
    """An error reply; ``errno`` is the errno Xen (or Linux) would return."""
    return {"ok": False, "error": message, "errno": errno_module.errorcode.get(errno, str(errno))}


def errno_from_name(name: object) -> int | None:
    """The errno value for an error reply's ``errno`` field."""
    if type(name) is not str:
        return None
    value = getattr(errno_module, name, None)
    return value if type(value) is int else None


# --- framing: bytes + fds over SOCK_SEQPACKET -------------------------------


@attrs.define(slots=True)
class Received:
    """One received control message. ``message`` is None and ``error`` says
    why when the message was malformed (its fds are then already closed)."""

    message: dict | None
    fds: list[int]
    error: str | None = None


def fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"{len(fds)} fds exceed the {MAX_FDS}-fd limit of one message")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def fds_from_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in the ancillary data (all of them, so the caller can close
    the lot even when the message is then refused)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def ancillary_space(max_fds: int) -> int:
    return socket.CMSG_SPACE(max(max_fds, 1) * _FD_SIZE)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def parse_received(data: bytes, ancdata, msg_flags: int, max_fds: int) -> Received | None:
    """Turn one recvmsg() result into a :class:`Received` (None at EOF)."""
    fds = fds_from_ancillary(ancdata)
    if not data and not fds and not msg_flags & socket.MSG_TRUNC:
        return None  # orderly shutdown: SOCK_SEQPACKET reads 0 bytes
    problem = None
    if msg_flags & socket.MSG_CTRUNC or len(fds) > max_fds:
        if max_fds == 0:
            problem = "requests carry no file descriptors, and this one had some attached"
        else:
            problem = f"too many file descriptors attached (at most {max_fds} allowed here)"
    elif msg_flags & socket.MSG_TRUNC:
        problem = f"message larger than {MAX_MESSAGE_SIZE} bytes"
    if problem is None:
        try:
            return Received(decode_message(data), fds)
        except ProtocolError as exc:
            problem = str(exc)
    close_fds(fds)
    return Received(None, [], problem)


def send_message(sock: socket.socket, message: Mapping[str, object], fds: Sequence[int] = ()) -> None:
    """Send one control message (blocking socket)."""
    data = encode_message(message)
    sent = sock.sendmsg([data], fds_ancillary(fds))
    if sent != len(data):
        raise ProtocolError(f"short send of a control message ({sent} of {len(data)} bytes)")


def recv_message(sock: socket.socket, *, max_fds: int = MAX_FDS) -> Received | None:
    """Receive one control message (blocking socket); None at EOF."""
    data, ancdata, msg_flags, _addr = sock.recvmsg(MAX_MESSAGE_SIZE, ancillary_space(max_fds), socket.MSG_CMSG_CLOEXEC)
    return parse_received(data, ancdata, msg_flags, max_fds)


async def trio_send_message(sock, message: Mapping[str, object], fds: Sequence[int] = ()) -> None:
    """Send one control message on a ``trio.socket`` socket."""
    data = encode_message(message)
    sent = await sock.sendmsg([data], fds_ancillary(fds))
    if sent != len(data):
        raise ProtocolError(f"short send of a control message ({sent} of {len(data)} bytes)")


async def trio_recv_message(sock, *, max_fds: int = MAX_FDS) -> Received | None:
    """Receive one control message from a ``trio.socket`` socket; None at EOF."""
    data, ancdata, msg_flags, _addr = await sock.recvmsg(
        MAX_MESSAGE_SIZE, ancillary_space(max_fds), socket.MSG_CMSG_CLOEXEC
    )
    return parse_received(data, ancdata, msg_flags, max_fds)
