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

5. A xenstore handle's watch channel (op ``xs_open`` hands the client one
   end of a socketpair): simulator -> client only, one message per watch
   event, ``path NUL token NUL`` in UTF-8 (:func:`encode_watch_event`).

6. A set_irq_level channel (op ``irq_channel_open`` hands the client one
   end of a socketpair): requests :data:`IRQ_LEVEL_REQUEST`, each answered
   with :data:`IRQ_LEVEL_REPLY`; the same as the ``set_irq_level`` request
   without the cost of a control request, as the ioctl is cheap on Xen.

The guest's control connection also takes requests after ``hello``: the
guest-role ops of :data:`REQUESTS` (``devices``, ``grant_access``,
``grant_access_seq``, ``end_access``, ``vcpu_loop``); a device model's
connection takes every other op.

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

IRQ_LEVEL_REQUEST = struct.Struct("<II")
"""(irq, level), client -> simulator, on the channel ``irq_channel_open``
hands out: XEN_DMOP_set_irq_level as the ioctl it is on Xen, without a
JSON control request."""

IRQ_LEVEL_REPLY = struct.Struct("<I")
"""Simulator -> client, one per request: 0, or the errno it failed with
(the control op ``set_irq_level`` then says why)."""

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


def encode_watch_event(path: str, token: str) -> bytes:
    """One xenstore watch event, simulator -> client."""
    return f"{path}\0{token}\0".encode("utf-8")


def decode_watch_event(data: bytes) -> tuple[str, str]:
    """(path, token) of one watch event message."""
    parts = bytes(data).decode("utf-8", "replace").split("\0")
    if len(parts) != 3 or parts[2] != "":
        raise ProtocolError(f"malformed xenstore watch event {bytes(data)[:80]!r}")
    return parts[0], parts[1]


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


@attrs.frozen(slots=True)
class IntListField:
    """A request field that is a JSON array of integers in ``bounds``, with
    1 to ``max_len`` elements (used for grant references)."""

    bounds: tuple[int, int]
    max_len: int
    required: bool = True

    def check(self, op: str, name: str, value: object) -> None:
        if type(value) is not list:
            raise ProtocolError(f"{op}: field {name!r} must be an array of integers, not {_json_type(value)}")
        if not 1 <= len(value) <= self.max_len:
            raise ProtocolError(f"{op}: field {name!r} must hold 1 to {self.max_len} integers, not {len(value)}")
        lo, hi = self.bounds
        for i, item in enumerate(value):
            if type(item) is not int:
                raise ProtocolError(f"{op}: {name}[{i}] must be an integer, not {_json_type(item)}")
            if not lo <= item <= hi:
                raise ProtocolError(f"{op}: {name}[{i}] = {item} is out of range [{lo}, {hi}]")


MAX_GRANT_REFS_PER_MAP = 1024
"""Most grant references one map_grant_refs request may name (the JSON
reply must fit one control message)."""

XS_HANDLE = Field(int, U32)

GUEST_LOOP_MAX_VCPUS = 128
"""vCPUs of an Arm guest (GUEST_MAX_VCPUS), the most a vcpu_loop names."""
GUEST_LOOP_MAX_PAIRS = 2048
"""Most (vCPU, address) pairs of one vcpu_loop (64 vCPUs x 16 devices and
their rotation fit; the request must fit one control message)."""

PRIVCMD_MAX_IOEVENTFD_VCPUS = 4096
"""privcmd_ioeventfd_assign()'s limit on the vCPUs (ports) of one ioreq page."""

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
    # Replies {} once the simulator has acted on every record the client
    # sent on its event-channel devices before it (as before every request)
    # and run what they triggered: an unmask that must have run the kernel's
    # handlers before the device model looks at the slots, as Linux's
    # write() returns after the upcall it caused.
    "evtchn_sync": {},
    # XEN_DMOP_set_irq_level at a hypercall's cost: replies with one fd, a
    # channel of IRQ_LEVEL_REQUEST / IRQ_LEVEL_REPLY (set_irq_level above
    # stays, and says why a request was refused).
    "irq_channel_open": {},
    # The simulator's own: guest RAM as a file (replies with the RAM memfd).
    "guest_ram": {"domid": DOMID},
    # --- the dom0 kernel's privcmd eventfd ioctls (Linux >= 6.7). Each
    # carries its eventfd as the one SCM_RIGHTS fd (REQUEST_FDS) and replies
    # {}; flags bit 0 is DEASSIGN, any other bit is EINVAL. ENOTTY from a
    # simulator run with --no-kernel-fast-path (an older kernel).
    # IOCTL_PRIVCMD_IOEVENTFD: id is the ioreq server (the kernel names it by
    # the address of the mapped ioreq page); ports holds one local port per
    # vCPU, in vCPU order, each bound on this connection's event-channel
    # device to that server's vp_eport of the vCPU; addr is the device's MMIO
    # base, addr_len 1, 2, 4 or 8. A write of addr_len bytes to addr + 0x50
    # (QueueNotify) whose low 16 bits equal vq then signals the eventfd and
    # completes without the ioreq loop. Deassign finds the eventfd on that
    # server (ENODEV if absent).
    "privcmd_ioeventfd": {
        "domid": DOMID,
        "id": SERVER_ID,
        "ports": IntListField(U32, PRIVCMD_MAX_IOEVENTFD_VCPUS),
        "addr": Field(int, U64),
        "addr_len": Field(int, U32),
        "vq": Field(int, U32),
        "flags": Field(int, U32),
    },
    # IOCTL_PRIVCMD_IRQFD with a prepared XEN_DMOP_set_irq_level(irq, 1):
    # every signal of the eventfd raises irq (an SPI, else EINVAL). Deassign
    # finds the eventfd (ENOENT if absent).
    "privcmd_irqfd": {"domid": DOMID, "irq": Field(int, U32), "flags": Field(int, U32)},
    # --- xenstore (device models; dom0 is privileged: any path, read and write).
    # xs_open replies {handle} with one fd: a socketpair end on which each
    # watch event arrives as one message "path\0token\0" (UTF-8), like
    # xenstored's XS_WATCH_EVENT payload. Closing that fd (or the control
    # connection) closes the handle and drops its watches. Paths are absolute
    # or relative to /local/domain/0. xs_read replies {value}, xs_directory
    # {names}; a missing node is ENOENT, a bad path EINVAL (see
    # xen.sim.xenstore for the rules).
    "xs_open": {},
    "xs_read": {"handle": XS_HANDLE, "path": Field(str)},
    "xs_write": {"handle": XS_HANDLE, "path": Field(str), "value": Field(str)},
    "xs_directory": {"handle": XS_HANDLE, "path": Field(str)},
    "xs_rm": {"handle": XS_HANDLE, "path": Field(str)},
    "xs_watch": {"handle": XS_HANDLE, "path": Field(str), "token": Field(str)},
    "xs_unwatch": {"handle": XS_HANDLE, "path": Field(str), "token": Field(str)},
    # --- guest memory for device models.
    # privcmd foreign mapping of count frames from gfn: replies {offset,
    # length} and the RAM memfd; every frame must be guest RAM of one bank
    # (else EINVAL naming the first bad gfn).
    "map_foreign": {"domid": DOMID, "gfn": Field(int, U64), "count": Field(int, (1, 0xFFFFFFFF))},
    # gntdev mapping of grant references of domain domid, read-write:
    # replies {offsets} (one per ref, in the RAM memfd) and the RAM memfd.
    # EINVAL for a ref that is not an active grant to dom0, EPERM for a
    # read-only grant.
    "map_grant_refs": {"domid": DOMID, "refs": IntListField(U32, MAX_GRANT_REFS_PER_MAP)},
    # The simulator's counters: {map_foreign_calls, map_foreign_pages,
    # map_grant_calls, map_grant_pages} (successful mappings, by every
    # device model), grants_active and xs_watches (registered watches),
    # kernel_kicks and kernel_irqs (QueueNotify writes and interrupts the
    # kernel fast path carried without a device model), ioreq_servers
    # (how many exist now).
    "stats": {},
    # --- guest-role requests (on the guest's control connection after hello).
    # devices: the guest's device tree, {devices: [{devid, type, virtio_id,
    # base, irq, grant_usage, backend_domid}]}.
    "devices": {},
    # gnttab_grant_foreign_access(): replies {ref}; backend_domid defaults to 0.
    "grant_access": {"gfn": Field(int, U64), "readonly": Field(bool), "backend_domid": Field(int, U16, required=False)},
    # gnttab_alloc_grant_reference_seq() + one grant per page: count
    # consecutive refs for gfn, gfn + 1, ...; replies {ref} (the first).
    "grant_access_seq": {
        "gfn": Field(int, U64),
        "count": Field(int, (1, 0xFFFFFFFF)),
        "readonly": Field(bool),
        "backend_domid": Field(int, U16, required=False),
    },
    # gnttab_end_foreign_access_ref(): EINVAL for a ref not in use.
    "end_access": {"ref": Field(int, U32)},
    # vCPUs running a load loop in the simulator, as a guest's instruction
    # loop runs where Xen runs its vCPU (xen.sim.vcpu_loop): vCPU vcpus[k]
    # loads size bytes from addrs[k] again and again for ms milliseconds,
    # each access trapping as one from the trap socket. Concurrently (the
    # vCPUs all different, one access in flight each) or one_at_a_time
    # (one access in flight, walking the (vcpu, addr) pairs cyclically).
    # Replies {accesses, ns (the time taken)} and one fd: a memfd of each
    # access's latency in ns (u64, little-endian, in completion order).
    # An access that fails ends the loop and the reply is that error (EIO).
    # EBUSY for a vCPU in the middle of an access; the vCPUs' trap sockets
    # refuse accesses while the loop runs.
    "vcpu_loop": {
        "vcpus": IntListField((0, GUEST_LOOP_MAX_VCPUS - 1), GUEST_LOOP_MAX_PAIRS),
        "addrs": IntListField(U64, GUEST_LOOP_MAX_PAIRS),
        "size": Field(int, U8),
        "ms": Field(int, U32),
        "one_at_a_time": Field(bool, required=False),
    },
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


# --- requests that carry file descriptors

REQUEST_FDS: dict[str, int] = {"privcmd_ioeventfd": 1, "privcmd_irqfd": 1}
"""The requests that carry file descriptors (SCM_RIGHTS), and how many
each carries; every other request carries none."""

MAX_REQUEST_FDS = max(REQUEST_FDS.values())


def check_request_fds(op: str, fds: Sequence[int]) -> None:
    """A request must carry exactly the fds its op takes (ProtocolError
    otherwise; the caller still owns and closes them)."""
    want = REQUEST_FDS.get(op, 0)
    if len(fds) == want:
        return
    if want == 0:
        raise ProtocolError(f"{op}: requests carry no file descriptors, and this one had {len(fds)} attached")
    raise ProtocolError(f"{op}: takes {want} file descriptor{'s' if want > 1 else ''} (SCM_RIGHTS), not {len(fds)}")


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
