"""The vhost-user front-end: connect, start and stop, in QEMU's order.

Real back-ends are tuned to the order QEMU sends things in, and
libvhost-user drops the connection on any request it does not implement or
that was not negotiated. So this module sends exactly QEMU's sequences and
refuses (``VhostUserError``) to send a request whose gate (protocol feature
or virtio bit 30) was not negotiated:

    connect  GET_FEATURES, [bit 30: GET_PROTOCOL_FEATURES,
             SET_PROTOCOL_FEATURES], [MQ: GET_QUEUE_NUM],
             [CONFIGURE_MEM_SLOTS: GET_MAX_MEM_SLOTS],
             [BACKEND_REQ: SET_BACKEND_REQ_FD], SET_OWNER, GET_FEATURES,
             [CONFIG and config_size: GET_CONFIG]
    start    SET_FEATURES, [INFLIGHT_SHMFD: GET_INFLIGHT_FD when no
             region is held yet, SET_INFLIGHT_FD], memory
             (REM_MEM_REG/ADD_MEM_REG with CONFIGURE_MEM_SLOTS, else
             SET_MEM_TABLE), per ring
             SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
             SET_VRING_CALL; [bit 30: SET_VRING_ENABLE(i, 1) per ring];
             [STATUS: SET_STATUS(0xf)]
    stop     [bit 30: SET_VRING_ENABLE(i, 0) per ring], GET_VRING_BASE per
             ring, [STATUS: SET_STATUS(0)]

With REPLY_ACK negotiated, every request that has no reply of its own is
sent with need-reply and its u64 ack awaited (non-zero: VhostUserError),
except SET_PROTOCOL_FEATURES itself, which QEMU sends without: REPLY_ACK is
not in force until that message has been processed.

File descriptors handed in (memory, kick, call) stay owned by the caller:
they are sent, never closed here.

With INFLIGHT_SHMFD the daemon hands out, once, a memfd in which it records
the requests it has taken from the rings and not yet completed (QEMU's
"inflight I/O tracking"). The front-end keeps it as an ``InflightRegion``
(``VhostUserFrontend.inflight``) and sends it back with SET_INFLIGHT_FD at
every start. After the daemon died, a new connection gets the same region
(``connect(..., inflight=old.take_inflight())``), so that the restarted
daemon resubmits what was in flight. The region belongs to exactly one
holder at a time: the front-end holding it closes it in ``aclose``, never
when it merely gives up on a daemon (the region must outlive the dead
connection); ``take_inflight`` moves it out, and then the caller owns it
until a ``connect`` succeeds with it.

A daemon that lies (a malformed or mismatched reply, an impossible value),
goes silent past the timeout or goes away cannot be trusted with anything
more: the front-end then closes the connection and the back-end channel at
once, so the daemon sees it go, and every later call raises
``ConnectionLost`` naming that first error. A daemon that merely refuses a
request (a non-zero ack, an empty GET_CONFIG) keeps its connection.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
from typing import Sequence

import attrs
import trio

from .backend_channel import BackendChannel, BackendHandler
from .connection import DEFAULT_TIMEOUT, Connection, close_fds, connect_unix
from .protocol import (
    BIT30_ACKED,
    BIT30_OFFERED,
    FRONTEND_REQUESTS,
    MAX_CONFIG_SIZE,
    MAX_MEMORY_REGIONS,
    PROTOCOL_FEATURES_MASK,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VHOST_ONLY_FEATURES_MASK,
    VIRTIO_F_VERSION_1,
    BackendRequest,
    ConnectionLost,
    DaemonTimeout,
    DeviceConfig,
    Empty,
    FrontendRequest,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolError,
    ProtocolFeature,
    SingleMemoryRegion,
    U64,
    VhostUserError,
    VirtioFeature,
    VringAddr,
    VringFd,
    VringState,
)

logger = logging.getLogger(__name__)

PF = ProtocolFeature
R = FrontendRequest

# What this front-end implements and so may negotiate.
SUPPORTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
    | PF.RESET_DEVICE | PF.INFLIGHT_SHMFD
)

# SET_STATUS at start: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
STATUS_DRIVER_READY = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK

# Kick/call/err carry the ring index in 8 bits.
MAX_RING_INDEX = 0xFF
MAX_QUEUE_SIZE = 32768
# Largest GET_QUEUE_NUM believed (virtio-net's maximum of queue pairs).
MAX_QUEUE_NUM = 0x8000

_DESC_SIZE = 16

MAPPING_SECONDS_PER_GIB = 4.0
"""Time a daemon gets, on top of the reply timeout, per GiB of memory it is
asked to map (SET_MEM_TABLE, ADD_MEM_REG). Mapping is linear in the size
for some: dpdk-testpmd without hugepages answers SET_MEM_TABLE for 3 GiB
after about 8 s here, while most daemons answer at once."""


def _nonneg(limit: int):
    def validate(instance: object, attribute: attrs.Attribute, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"{type(instance).__name__}.{attribute.name} = {value!r} is not "
                             f"in 0..{limit:#x}")

    return validate


def _int(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} = {value!r} is not an int")


_U64_MAX = (1 << 64) - 1


@attrs.frozen
class MemoryRegionFd:
    """One guest RAM region as handed to the daemon: guest-physical address,
    size, our own (user) mapping address of it, and the fd and offset in the
    fd where it starts. The daemon maps the fd from 0 to fd_offset + size."""

    gpa: int = attrs.field(validator=_nonneg(_U64_MAX))
    size: int = attrs.field(validator=_nonneg(_U64_MAX))
    user_addr: int = attrs.field(validator=_nonneg(_U64_MAX))
    fd: int = attrs.field(validator=_nonneg(0x7FFF_FFFF))
    fd_offset: int = attrs.field(validator=_nonneg(_U64_MAX))

    def wire(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.user_addr, self.fd_offset)


@attrs.frozen
class RingSetup:
    """One virtqueue to start: index, size, the index to resume from, our
    user addresses of its three parts, and its kick and call eventfds (a
    negative fd sends the no-fd flag instead: the daemon polls)."""

    index: int = attrs.field(validator=_nonneg(MAX_RING_INDEX))
    num: int = attrs.field(validator=_nonneg(MAX_QUEUE_SIZE))
    base: int = attrs.field(validator=_nonneg(0xFFFF_FFFF))
    desc_addr: int = attrs.field(validator=_nonneg(_U64_MAX))
    avail_addr: int = attrs.field(validator=_nonneg(_U64_MAX))
    used_addr: int = attrs.field(validator=_nonneg(_U64_MAX))
    kick_fd: int = attrs.field(validator=_int)
    call_fd: int = attrs.field(validator=_int)


@attrs.frozen
class Step:
    """One request of a planned sequence. ``extra_time``: seconds the
    daemon gets for its reply on top of the connection's timeout."""

    request: FrontendRequest
    payload: object = Empty()
    fds: tuple[int, ...] = ()
    extra_time: float = 0.0


def mapping_time(size: int) -> float:
    """Extra reply time for a daemon to map ``size`` bytes of memory."""
    return MAPPING_SECONDS_PER_GIB * size / (1 << 30)


class _Custody:
    """The mutable side of an ``InflightRegion``: whether its fd is closed,
    and which front-end holds it (None: whoever took it out)."""

    __slots__ = ("closed", "holder")

    def __init__(self) -> None:
        self.closed = False
        self.holder: str | None = None


@attrs.frozen(eq=False)
class InflightRegion:
    """The inflight-tracking memory a daemon handed out with
    GET_INFLIGHT_FD: its memfd, the size and offset to map, and the
    geometry the daemon laid it out for (``num_queues`` rings of up to
    ``queue_size`` descriptors).

    The fd has exactly one owner at a time: the front-end that holds the
    region (``VhostUserFrontend.inflight``), or, after ``take_inflight``,
    the caller, who passes it to ``VhostUserFrontend.connect(inflight=)``
    or closes it. ``close`` is idempotent: the fd is closed exactly once,
    and a closed region can be handed to nobody."""

    fd: int = attrs.field(validator=_nonneg(0x7FFF_FFFF))
    mmap_size: int = attrs.field(validator=_nonneg(_U64_MAX))
    mmap_offset: int = attrs.field(validator=_nonneg(_U64_MAX))
    num_queues: int = attrs.field(validator=_nonneg(0xFFFF))
    queue_size: int = attrs.field(validator=_nonneg(0xFFFF))
    _custody: _Custody = attrs.field(factory=_Custody, init=False, repr=False)

    @property
    def closed(self) -> bool:
        return self._custody.closed

    def close(self) -> None:
        """Close the memfd (once; later calls do nothing). Only its owner
        may call this: never on a region a front-end still holds."""
        if not self._custody.closed:
            self._custody.closed = True
            self._custody.holder = None
            try:
                os.close(self.fd)
            except OSError:
                pass

    def fits(self, num_queues: int, queue_size: int) -> bool:
        """Laid out for exactly these queues, with room for rings of
        ``queue_size`` descriptors."""
        return self.num_queues == num_queues and self.queue_size >= queue_size

    def wire(self) -> Inflight:
        return Inflight(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    def describe(self) -> str:
        return (f"{self.mmap_size} bytes at offset {self.mmap_offset} for {self.num_queues} "
                f"queues of {self.queue_size}")


# -- pure planning ---------------------------------------------------------


def negotiate_protocol_features(offered: int) -> ProtocolFeature:
    return ProtocolFeature(offered & SUPPORTED_PROTOCOL_FEATURES)


def ring_start_steps(ring: RingSetup) -> list[Step]:
    """SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_KICK.

    The call fd goes before the kick fd, as QEMU sends them for a device
    whose guest notifiers are set up first (virtio-pci): libvhost-user
    starts a ring at SET_VRING_KICK and, when the kick eventfd already
    holds kicks (a resume after the daemon restarted), completes requests
    at once; with no call fd yet it panics writing fd -1."""
    steps = [
        Step(R.SET_VRING_NUM, VringState(ring.index, ring.num)),
        Step(R.SET_VRING_BASE, VringState(ring.index, ring.base)),
        Step(R.SET_VRING_ADDR, VringAddr(ring.index, 0, ring.desc_addr, ring.used_addr,
                                         ring.avail_addr, 0)),
    ]
    for request, fd in ((R.SET_VRING_CALL, ring.call_fd), (R.SET_VRING_KICK, ring.kick_fd)):
        if fd < 0:
            steps.append(Step(request, VringFd(ring.index, no_fd=True)))
        else:
            steps.append(Step(request, VringFd(ring.index), (fd,)))
    return steps


def ring_enable_steps(indices: Sequence[int], enable: bool) -> list[Step]:
    return [Step(R.SET_VRING_ENABLE, VringState(i, int(enable))) for i in indices]


RegionKey = tuple[int, ...]


def memory_slot_steps(wanted: dict[RegionKey, MemoryRegionFd],
                      known: dict[RegionKey, MemoryRegion]) -> list[tuple[RegionKey, Step]]:
    """With CONFIGURE_MEM_SLOTS: REM_MEM_REG for every region the back-end
    has that is no longer wanted, then ADD_MEM_REG for every wanted region
    it does not have yet (QEMU's order: removals first). Each step comes
    with the key of the region it removes or adds."""
    steps = [(key, Step(R.REM_MEM_REG, SingleMemoryRegion(region)))
             for key, region in known.items() if key not in wanted]
    steps += [(key, Step(R.ADD_MEM_REG, SingleMemoryRegion(region.wire()), (region.fd,),
                         extra_time=mapping_time(region.size)))
              for key, region in wanted.items() if key not in known]
    return steps


def memory_table_step(regions: Sequence[MemoryRegionFd]) -> Step:
    return Step(R.SET_MEM_TABLE, MemoryTable(r.wire() for r in regions),
                tuple(r.fd for r in regions), extra_time=mapping_time(sum(r.size for r in regions)))


def ring_extents(ring: RingSetup, packed: bool) -> list[tuple[str, int, int]]:
    """(name, user address, length) of the parts of a ring."""
    if packed:
        return [("descriptor ring", ring.desc_addr, _DESC_SIZE * ring.num),
                ("driver area", ring.avail_addr, 4),
                ("device area", ring.used_addr, 4)]
    return [("descriptor table", ring.desc_addr, _DESC_SIZE * ring.num),
            ("avail ring", ring.avail_addr, 6 + 2 * ring.num),
            ("used ring", ring.used_addr, 6 + 8 * ring.num)]


def check_regions(regions: Sequence[MemoryRegionFd]) -> None:
    """Non-empty regions whose guest ranges and user ranges do not overlap."""
    for r in regions:
        r.wire()  # range checks of the wire format
        if r.size == 0:
            raise VhostUserError(f"memory region at gpa {r.gpa:#x} has size 0")
    for attr in ("gpa", "user_addr"):
        spans = sorted((getattr(r, attr), getattr(r, attr) + r.size) for r in regions)
        for (start_a, end_a), (start_b, _) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise VhostUserError(f"memory regions overlap: {attr} {start_a:#x}..{end_a:#x} "
                                     f"and {start_b:#x}")


def check_rings(rings: Sequence[RingSetup], regions: Sequence[MemoryRegionFd], *,
                num_queues: int, packed: bool) -> None:
    seen: set[int] = set()
    for ring in rings:
        if ring.index in seen:
            raise VhostUserError(f"ring {ring.index} appears twice")
        seen.add(ring.index)
        if ring.index >= num_queues:
            raise VhostUserError(f"ring {ring.index} does not exist: the daemon has "
                                 f"{num_queues} queues")
        if not 1 <= ring.num <= MAX_QUEUE_SIZE:
            raise VhostUserError(f"ring {ring.index} size {ring.num} is not in "
                                 f"1..{MAX_QUEUE_SIZE}")
        if not packed and ring.base > 0xFFFF:
            raise VhostUserError(f"ring {ring.index} base {ring.base:#x} does not fit a split "
                                 f"ring's 16-bit index")
        for part, start, length in ring_extents(ring, packed):
            if not any(r.user_addr <= start and start + length <= r.user_addr + r.size
                       for r in regions):
                raise VhostUserError(
                    f"ring {ring.index} {part} at user address {start:#x} (+{length:#x}) is "
                    f"not inside one memory region")


# -- the trio front-end ----------------------------------------------------


class VhostUserFrontend:
    """One vhost-user connection, driven the way QEMU drives it."""

    device_features: int
    has_protocol_features: bool
    protocol_features: ProtocolFeature
    num_queues: int
    max_mem_slots: int | None
    config: bytes

    def __init__(self, conn: Connection, *, label: str) -> None:
        """Use ``connect`` or ``from_socket``."""
        self._conn = conn
        self.label = label
        self._channel: BackendChannel | None = None
        self.device_features = 0
        self.has_protocol_features = False
        self.protocol_features = ProtocolFeature(0)
        self.num_queues = 0
        self._rings_per_queue = 1
        self.max_mem_slots = None
        self.config = b""
        # Virtio features as last sent with SET_FEATURES (with bit 30).
        self._acked_features: int | None = None
        # Regions of the last start, for checking ring addresses.
        self._regions: tuple[MemoryRegionFd, ...] = ()
        # With CONFIGURE_MEM_SLOTS: the regions the back-end has mapped.
        self._backend_regions: dict[RegionKey, MemoryRegion] = {}
        self._running: set[int] = set()
        # With INFLIGHT_SHMFD: the region this front-end holds (and owns).
        self._inflight: InflightRegion | None = None
        self._closed = False
        # Why the front-end gave up on the daemon, once it has.
        self._failure: str | None = None

    # -- construction

    @classmethod
    async def connect(cls, path: str, *, nursery: trio.Nursery, handler: BackendHandler,
                      default_num_queues: int, config_size: int,
                      timeout: float = DEFAULT_TIMEOUT,
                      inflight: InflightRegion | None = None,
                      rings_per_queue: int = 1) -> VhostUserFrontend:
        """Dial the daemon at ``path`` and run the connect sequence. The
        back-end channel reader (with BACKEND_REQ) runs in ``nursery``.

        ``rings_per_queue``: how many rings each queue GET_QUEUE_NUM counts
        has (2 for virtio-net, whose daemons count receive/transmit pairs,
        as QEMU's vhost-user net reads it); ``num_queues`` is then rings,
        at most the 256 that vhost-user can address.

        ``inflight``: a region taken from an earlier front-end of the same
        device (``take_inflight``), to be sent at the next ``start`` in
        place of a new one, so that a restarted daemon resubmits what was
        in flight. The new front-end owns it once ``connect`` returns (and
        closes it at once, with an info log, when the daemon does not
        negotiate INFLIGHT_SHMFD); if ``connect`` raises, the caller still
        owns it (and can retry with it)."""
        _check_connect_args(default_num_queues, config_size)
        _check_handover(inflight)
        sock = await connect_unix(path, timeout=timeout)
        return await cls.from_socket(sock, nursery=nursery, handler=handler,
                                     default_num_queues=default_num_queues,
                                     config_size=config_size, timeout=timeout, label=path,
                                     inflight=inflight, rings_per_queue=rings_per_queue)

    @classmethod
    async def from_socket(cls, sock: trio.socket.SocketType, *, nursery: trio.Nursery,
                          handler: BackendHandler, default_num_queues: int, config_size: int,
                          timeout: float = DEFAULT_TIMEOUT, label: str = "vhost-user",
                          inflight: InflightRegion | None = None,
                          rings_per_queue: int = 1) -> VhostUserFrontend:
        """Like ``connect`` on an already connected socket (which it takes
        over and closes on failure)."""
        try:
            _check_connect_args(default_num_queues, config_size)
            _check_handover(inflight)
            conn = Connection(sock, label=label, timeout=timeout)
        except (ValueError, TypeError):
            sock.close()
            raise
        self = cls(conn, label=label)
        self._rings_per_queue = rings_per_queue
        if inflight is not None:
            # Reserved for the duration of the handshake: nobody else may
            # take it meanwhile; released again if the handshake fails.
            inflight._custody.holder = label
        ok = False
        try:
            await self._handshake(nursery, handler, default_num_queues, config_size)
            ok = True
        finally:
            if not ok:
                if inflight is not None:
                    inflight._custody.holder = None
                self._close_now()
        if inflight is not None:
            if self.protocol_features & PF.INFLIGHT_SHMFD:
                self._inflight = inflight
                logger.info("%s: resuming with the inflight region of an earlier connection "
                            "(%s)", self.label, inflight.describe())
            else:
                logger.info("%s: the daemon does not negotiate INFLIGHT_SHMFD: closing the "
                            "inflight region handed over (%s); requests recorded in it as in "
                            "flight will not be resubmitted", self.label, inflight.describe())
                inflight.close()
        return self

    async def _handshake(self, nursery: trio.Nursery, handler: BackendHandler,
                         default_num_queues: int, config_size: int) -> None:
        try:
            features = await self._query_u64(R.GET_FEATURES)
        except DaemonTimeout as e:
            if e.received:
                raise
            raise DaemonTimeout(f"{e} (is another front-end connected? qemu-storage-daemon "
                                f"serves one at a time)") from None
        self._check_version_1(features)
        self.has_protocol_features = bool(features & PROTOCOL_FEATURES_MASK)

        if self.has_protocol_features:
            offered = await self._query_u64(R.GET_PROTOCOL_FEATURES)
            negotiated = negotiate_protocol_features(offered)
            # Not under REPLY_ACK yet: that takes effect once this is processed.
            await self._send(Step(R.SET_PROTOCOL_FEATURES, U64(int(negotiated))))
            self.protocol_features = negotiated

        if self.protocol_features & PF.MQ:
            queues = await self._query_u64(R.GET_QUEUE_NUM)
            if not 1 <= queues <= MAX_QUEUE_NUM:
                raise self._lie(f"GET_QUEUE_NUM says {queues} queues, a device has "
                                f"1..{MAX_QUEUE_NUM}")
            self.num_queues = min(queues * self._rings_per_queue, MAX_RING_INDEX + 1)
        else:
            self.num_queues = default_num_queues

        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            slots = await self._query_u64(R.GET_MAX_MEM_SLOTS)
            if slots == 0:
                raise self._lie("GET_MAX_MEM_SLOTS says 0 memory slots although it offers "
                                "CONFIGURE_MEM_SLOTS")
            self.max_mem_slots = slots

        if self.protocol_features & PF.BACKEND_REQ:
            await self._open_backend_channel(nursery, handler)

        await self._command(Step(R.SET_OWNER))

        again = await self._query_u64(R.GET_FEATURES)
        if (again ^ features) & PROTOCOL_FEATURES_MASK:
            raise self._lie(f"GET_FEATURES changed bit 30 (VHOST_USER_F_PROTOCOL_FEATURES) "
                            f"after SET_OWNER ({features:#x} then {again:#x})")
        self._check_version_1(again)
        if again != features:
            logger.warning("%s: GET_FEATURES changed after SET_OWNER: %#x then %#x; using "
                           "the latter", self.label, features, again)
        self.device_features = again & ~VHOST_ONLY_FEATURES_MASK

        if self.protocol_features & PF.CONFIG and config_size > 0:
            self.config = await self.get_config(config_size)

        logger.info("%s: connected: features %#x, protocol features %#x (%s), %d queues%s",
                    self.label, again, int(self.protocol_features),
                    _flag_names(self.protocol_features), self.num_queues,
                    f", {self.max_mem_slots} memory slots" if self.max_mem_slots else "")

    async def _open_backend_channel(self, nursery: trio.Nursery, handler: BackendHandler) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ok = False
        try:
            conn = Connection.from_stdlib(ours, label=f"{self.label} (back-end channel)",
                                          kind=BackendRequest, timeout=self._conn.timeout)
            await self._command(Step(R.SET_BACKEND_REQ_FD, Empty(), (theirs.fileno(),)))
            ok = True
        finally:
            # The daemon has its own copy now (or never will).
            theirs.close()
            if not ok:
                ours.close()
        self._channel = BackendChannel(conn, handler, protocol_features=self.protocol_features,
                                       num_queues=self.num_queues)
        await nursery.start(self._channel.run)

    def _check_version_1(self, features: int) -> None:
        if not features >> VIRTIO_F_VERSION_1 & 1:
            raise VhostUserError(
                f"{self.label}: the vhost-user daemon does not offer VIRTIO_F_VERSION_1 "
                f"(GET_FEATURES {features:#x}): it is a legacy virtio device, and only virtio "
                f"1.x devices can be driven")

    # -- giving up on a daemon

    def _give_up(self, error: VhostUserError) -> None:
        """The daemon lied, went silent or went away: close the connection
        and the back-end channel so that it sees us go, and remember why."""
        if self._failure is None:
            reason = str(error)
            prefix = f"{self.label}: "
            self._failure = reason[len(prefix):] if reason.startswith(prefix) else reason
            logger.warning("%s: closing the vhost-user connection: %s", self.label,
                           self._failure)
        self._close_now()

    def _lie(self, what: str) -> ProtocolError:
        """Give up on a daemon that said something untrue; the error to raise."""
        error = ProtocolError(f"{self.label}: the vhost-user daemon lies: {what}")
        self._give_up(error)
        return error

    # -- requests

    def _check_gate(self, request: FrontendRequest) -> None:
        gate = FRONTEND_REQUESTS[request].gate
        if gate is None:
            return
        if gate == BIT30_OFFERED:
            if not self.has_protocol_features:
                raise VhostUserError(f"{self.label}: refusing to send {request.name}: the "
                                     f"daemon does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        elif gate == BIT30_ACKED:
            if not self._bit30_acked:
                raise VhostUserError(f"{self.label}: refusing to send {request.name}: "
                                     f"VHOST_USER_F_PROTOCOL_FEATURES was not acknowledged "
                                     f"with SET_FEATURES")
        elif not self.protocol_features & gate:
            raise VhostUserError(f"{self.label}: refusing to send {request.name}: protocol "
                                 f"feature {gate.name} was not negotiated")

    @property
    def _bit30_acked(self) -> bool:
        """Rings start disabled and take SET_VRING_ENABLE only once bit 30
        went out with SET_FEATURES."""
        return bool((self._acked_features or 0) & PROTOCOL_FEATURES_MASK)

    def _check_payload(self, step: Step) -> bytes:
        layout = FRONTEND_REQUESTS[step.request]
        if not isinstance(step.payload, layout.request):
            raise TypeError(f"{step.request.name} takes a {layout.request.__name__}, not "
                            f"{type(step.payload).__name__}")
        return step.payload.pack()  # type: ignore[attr-defined]

    def _check_open(self) -> None:
        if self._failure is not None:
            raise ConnectionLost(f"{self.label}: the vhost-user connection was closed after "
                                 f"an earlier error: {self._failure}")
        if self._closed:
            raise VhostUserError(f"{self.label}: the vhost-user front-end is closed")

    async def _send(self, step: Step) -> None:
        """Send without waiting for anything."""
        self._check_open()
        self._check_gate(step.request)
        payload = self._check_payload(step)
        try:
            await self._conn.send(step.request, payload, step.fds)
        except (DaemonTimeout, ConnectionLost) as e:
            self._give_up(e)
            raise

    async def _transact(self, step: Step, *, need_reply: bool = False,
                        max_reply_fds: int = 0) -> Message:
        self._check_open()
        self._check_gate(step.request)
        payload = self._check_payload(step)
        try:
            return await self._conn.transact(step.request, payload, step.fds,
                                             need_reply=need_reply,
                                             max_reply_fds=max_reply_fds,
                                             timeout=(self._conn.timeout + step.extra_time
                                                      if step.extra_time else None))
        except (ProtocolError, DaemonTimeout, ConnectionLost) as e:
            self._give_up(e)
            raise

    async def _command(self, step: Step) -> None:
        """A request without a reply of its own: acked when REPLY_ACK is on."""
        if FRONTEND_REQUESTS[step.request].reply is not None:
            raise TypeError(f"{step.request.name} has a reply; use _query")
        if not self.protocol_features & PF.REPLY_ACK:
            await self._send(step)
            return
        reply = await self._transact(step, need_reply=True)
        ack = self._decode(reply, U64).value
        if ack != 0:
            raise VhostUserError(f"{self.label}: the vhost-user daemon rejected "
                                 f"{step.request.name} (ack {ack:#x})")

    async def _query(self, step: Step, *, max_reply_fds: int = 0) -> Message:
        """A request with a reply of its own; returns the reply message,
        whose fds (at most ``max_reply_fds``) the caller then owns."""
        if FRONTEND_REQUESTS[step.request].reply is None:
            raise TypeError(f"{step.request.name} has no reply; use _command")
        return await self._transact(step, max_reply_fds=max_reply_fds)

    async def _query_u64(self, request: FrontendRequest) -> int:
        reply = await self._query(Step(request))
        return self._decode(reply, U64).value

    def _decode(self, reply: Message, cls: type):
        try:
            return reply.decode(cls)
        except ProtocolError as e:
            name = FrontendRequest(reply.request).name
            raise self._lie(f"its reply to {name} is malformed: {e}") from None

    # -- config space

    async def get_config(self, size: int) -> bytes:
        """Read ``size`` bytes of the device config space from offset 0."""
        if not self.protocol_features & PF.CONFIG:
            raise VhostUserError(f"{self.label}: the daemon did not negotiate CONFIG; its "
                                 f"config space cannot be read")
        if not 0 < size <= MAX_CONFIG_SIZE:
            raise ValueError(f"config size {size} is not in 1..{MAX_CONFIG_SIZE}")
        reply = await self._query(Step(R.GET_CONFIG, DeviceConfig(0, size, 0, bytes(size))))
        if not reply.payload:
            raise ProtocolError(f"{self.label}: the vhost-user daemon refused GET_CONFIG of "
                                f"{size} bytes (empty reply)")
        got = self._decode(reply, DeviceConfig)
        if got.size == 0:
            raise ProtocolError(f"{self.label}: the vhost-user daemon refused GET_CONFIG of "
                                f"{size} bytes (size 0)")
        if got.offset != 0 or got.size != size:
            raise self._lie(f"asked for {size} config bytes at offset 0 with GET_CONFIG, "
                            f"got {got.size} at offset {got.offset}")
        return got.data

    async def probe_config(self) -> bytes:
        """The whole config space of a device the front-end knows nothing
        about: the longest GET_CONFIG from offset 0 the daemon answers.

        A daemon answers any size up to its config struct and refuses
        longer reads with an empty reply (libvhost-user's get_config
        callbacks do exactly that), so a binary search over 1..256 finds
        the size in at most nine reads. b"" when even one byte is refused
        or CONFIG was not negotiated."""
        if not self.protocol_features & PF.CONFIG:
            return b""
        best, good, bad = b"", 0, MAX_CONFIG_SIZE + 1
        size = MAX_CONFIG_SIZE
        while good + 1 < bad:
            try:
                data = await self.get_config(size)
            except ProtocolError:
                self._check_open()
                bad = size
            else:
                best, good = data, size
            size = (good + bad) // 2
        logger.info("%s: the daemon's config space is %d bytes", self.label, len(best))
        return best

    async def set_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the config space (flags 0: a
        driver write, not migration)."""
        if not self.protocol_features & PF.CONFIG:
            raise VhostUserError(f"{self.label}: the daemon did not negotiate CONFIG; its "
                                 f"config space cannot be written")
        data = bytes(data)
        if not data:
            raise ValueError("SET_CONFIG needs at least one byte")
        await self._command(Step(R.SET_CONFIG, DeviceConfig(offset, len(data), 0, data)))

    # -- vhost-user-gpu

    async def set_gpu_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET: give a vhost-user-gpu daemon its end of the
        display channel (vhost_user.gpu_display). QEMU sends it at
        DRIVER_OK, before SET_FEATURES. The daemon at once asks for the
        display protocol features on it, so the channel must already be
        served. vhost-user-gpu takes one such socket per connection and
        ignores any later one: send it once per connection. The fd stays
        the caller's."""
        await self._command(Step(R.GPU_SET_SOCKET, Empty(), (fd,)))

    # -- start / stop

    async def start(self, features: int, regions: Sequence[MemoryRegionFd],
                    rings: Sequence[RingSetup], *, enabled: Sequence[int] | None = None) -> None:
        """The driver wrote DRIVER_OK: hand features, memory and rings over.

        ``enabled``: the rings that get SET_VRING_ENABLE(1) (default: all of
        ``rings``); the others stay disabled until ``set_rings_enabled``
        (virtio-net's pairs beyond the first).

        With INFLIGHT_SHMFD the inflight region held goes first (one is
        asked for when none is held, or when the one held was laid out for
        another number of queues or for smaller rings than the largest
        ring of this start)."""
        self._check_open()
        regions = tuple(regions)
        rings = tuple(rings)
        self._check_features(features)
        if not regions:
            raise VhostUserError(f"{self.label}: cannot start without memory regions")
        check_regions(regions)
        packed = bool(features & (1 << VirtioFeature.RING_PACKED))
        check_rings(rings, regions, num_queues=self.num_queues, packed=packed)
        already = sorted(self._running & {r.index for r in rings})
        if already:
            raise VhostUserError(f"{self.label}: rings {already} are running; stop them first")

        wire_features = features | (PROTOCOL_FEATURES_MASK if self.has_protocol_features else 0)
        await self._command(Step(R.SET_FEATURES, U64(wire_features)))
        self._acked_features = wire_features
        if self.protocol_features & PF.INFLIGHT_SHMFD and rings:
            await self._set_inflight(max(r.num for r in rings))
        await self._set_memory(regions)
        self._regions = regions
        for ring in rings:
            for step in ring_start_steps(ring):
                await self._command(step)
        if self._bit30_acked:
            chosen = [r.index for r in rings] if enabled is None else \
                [r.index for r in rings if r.index in set(enabled)]
            for step in ring_enable_steps(chosen, True):
                await self._command(step)
        self._running.update(r.index for r in rings)
        if self.protocol_features & PF.STATUS:
            await self._command(Step(R.SET_STATUS, U64(STATUS_DRIVER_READY)))

    async def stop(self, ring_indices: Sequence[int]) -> dict[int, int]:
        """The driver reset the device: stop the rings, return {index: base}."""
        self._check_open()
        indices = self._check_indices(ring_indices)
        if self._bit30_acked:
            for step in ring_enable_steps(indices, False):
                await self._command(step)
        bases = {}
        for index in indices:
            bases[index] = await self._get_vring_base(index)
        if self.protocol_features & PF.STATUS:
            await self._command(Step(R.SET_STATUS, U64(0)))
        return bases

    async def start_ring(self, ring: RingSetup) -> None:
        """(Re)start one ring after ``start`` (virtio queue reset)."""
        self._check_open()
        if self._acked_features is None:
            raise VhostUserError(f"{self.label}: start_ring before start")
        if ring.index in self._running:
            raise VhostUserError(f"{self.label}: ring {ring.index} is running; stop it first")
        packed = bool(self._acked_features & (1 << VirtioFeature.RING_PACKED))
        check_rings([ring], self._regions, num_queues=self.num_queues, packed=packed)
        region = self._inflight
        if self.protocol_features & PF.INFLIGHT_SHMFD and region is not None \
                and ring.num > region.queue_size:
            raise VhostUserError(f"{self.label}: ring {ring.index} size {ring.num} does not fit "
                                 f"the inflight region, laid out for rings of up to "
                                 f"{region.queue_size} descriptors; restart the device "
                                 f"instead")
        for step in ring_start_steps(ring):
            await self._command(step)
        if self._bit30_acked:
            for step in ring_enable_steps([ring.index], True):
                await self._command(step)
        self._running.add(ring.index)

    async def set_rings_enabled(self, ring_indices: Sequence[int], enable: bool) -> None:
        """SET_VRING_ENABLE on running rings (only with bit 30 acked: rings
        without it are always enabled and the request is not legal)."""
        self._check_open()
        indices = self._check_indices(ring_indices)
        stopped = [i for i in indices if i not in self._running]
        if stopped:
            raise VhostUserError(f"{self.label}: rings {stopped} are not running")
        if not self._bit30_acked:
            raise VhostUserError(f"{self.label}: SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES")
        for step in ring_enable_steps(indices, enable):
            await self._command(step)

    async def stop_ring(self, index: int) -> int:
        """Stop one ring; returns the index to resume it from."""
        self._check_open()
        (index,) = self._check_indices([index])
        if self._bit30_acked:
            for step in ring_enable_steps([index], False):
                await self._command(step)
        return await self._get_vring_base(index)

    async def reset_device(self) -> None:
        """RESET_DEVICE (only when negotiated): the daemon disables every
        ring and forgets device state; memory stays mapped. ``start`` must
        follow before any ring is used again."""
        self._check_open()
        await self._command(Step(R.RESET_DEVICE))
        self._running.clear()
        self._acked_features = None

    def _check_features(self, features: int) -> None:
        if isinstance(features, bool) or not isinstance(features, int) or features < 0:
            raise ValueError(f"features {features!r} is not a feature word")
        extra = features & ~self.device_features
        if extra:
            raise VhostUserError(f"{self.label}: driver features {features:#x} include bits "
                                 f"{extra:#x} the device does not offer "
                                 f"({self.device_features:#x})")

    def _check_indices(self, ring_indices: Sequence[int]) -> list[int]:
        indices = list(ring_indices)
        if len(set(indices)) != len(indices):
            raise VhostUserError(f"{self.label}: ring indices {indices} repeat")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_queues \
                    or i > MAX_RING_INDEX:
                raise VhostUserError(f"{self.label}: ring {i!r} does not exist: the daemon has "
                                     f"{self.num_queues} queues")
        return indices

    async def _get_vring_base(self, index: int) -> int:
        reply = await self._query(Step(R.GET_VRING_BASE, VringState(index, 0)))
        state = self._decode(reply, VringState)
        if state.index != index:
            raise self._lie(f"GET_VRING_BASE for ring {index} answered ring {state.index}")
        packed = bool((self._acked_features or 0) & (1 << VirtioFeature.RING_PACKED))
        if not packed and state.num > 0xFFFF:
            raise self._lie(f"GET_VRING_BASE says ring {index} base is {state.num:#x}, which "
                            f"does not fit a split ring's 16-bit index")
        self._running.discard(index)
        return state.num

    async def _set_memory(self, regions: tuple[MemoryRegionFd, ...]) -> None:
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            assert self.max_mem_slots is not None
            if len(regions) > self.max_mem_slots:
                raise VhostUserError(f"{self.label}: {len(regions)} memory regions, the daemon "
                                     f"takes at most {self.max_mem_slots}")
            wanted = {_region_key(r): r for r in regions}
            for key, step in memory_slot_steps(wanted, self._backend_regions):
                await self._command(step)
                if step.request is R.REM_MEM_REG:
                    del self._backend_regions[key]
                else:
                    self._backend_regions[key] = wanted[key].wire()
        else:
            if len(regions) > MAX_MEMORY_REGIONS:
                raise VhostUserError(f"{self.label}: {len(regions)} memory regions; without "
                                     f"CONFIGURE_MEM_SLOTS the daemon takes at most "
                                     f"{MAX_MEMORY_REGIONS}")
            await self._command(memory_table_step(regions))

    # -- inflight tracking (INFLIGHT_SHMFD)

    @property
    def inflight(self) -> InflightRegion | None:
        """The inflight region this front-end holds and owns, if any. It
        is kept across starts on this connection; QEMU drops it when the
        guest resets the device (``take_inflight().close()`` does that)."""
        return self._inflight

    def take_inflight(self) -> InflightRegion | None:
        """Hand the inflight region over, typically from a front-end whose
        daemon died to ``connect(..., inflight=)`` of the next one: this
        front-end forgets it (``aclose`` leaves it open) and the caller owns
        it from now on. None when there is none. Works on a closed or
        failed front-end too; that is what it is for."""
        region, self._inflight = self._inflight, None
        if region is not None:
            region._custody.holder = None
        return region

    async def _set_inflight(self, queue_size: int) -> None:
        """SET_INFLIGHT_FD with the region held, after GET_INFLIGHT_FD
        when none is held yet or the one held does not fit this start."""
        region = self._inflight
        if region is not None and not region.fits(self.num_queues, queue_size):
            logger.warning("%s: the inflight region held (%s) does not fit %d queues of %d; "
                           "closing it and asking the daemon for a new one: requests "
                           "recorded in it as in flight will not be resubmitted", self.label,
                           region.describe(), self.num_queues, queue_size)
            self.take_inflight()
            region.close()
            region = None
        if region is None:
            region = await self._get_inflight(queue_size)
            region._custody.holder = self.label
            self._inflight = region
        await self._command(Step(R.SET_INFLIGHT_FD, region.wire(), (region.fd,)))

    async def _get_inflight(self, queue_size: int) -> InflightRegion:
        """GET_INFLIGHT_FD for our queues; the reply must echo them, give
        a non-empty region and carry exactly one fd: a writable regular
        file (a memfd) long enough to map the region from."""
        asked = Inflight(0, 0, self.num_queues, queue_size)
        reply = await self._query(Step(R.GET_INFLIGHT_FD, asked), max_reply_fds=1)
        fds = list(reply.fds)
        try:
            got = self._decode(reply, Inflight)
            if got.mmap_size == 0:
                # libvhost-user's answer when it cannot allocate the region.
                raise VhostUserError(f"{self.label}: the vhost-user daemon refused "
                                     f"GET_INFLIGHT_FD (mmap_size 0)")
            if (got.num_queues, got.queue_size) != (asked.num_queues, asked.queue_size):
                raise self._lie(f"asked GET_INFLIGHT_FD for {asked.num_queues} queues of "
                                f"{asked.queue_size}, got a region for {got.num_queues} "
                                f"queues of {got.queue_size}")
            if not fds:
                raise self._lie(f"its reply to GET_INFLIGHT_FD ({got.mmap_size} bytes at "
                                f"offset {got.mmap_offset}) carries no fd")
            (fd,) = fds
            problem = _inflight_fd_problem(fd, got.mmap_offset + got.mmap_size)
            if problem is not None:
                raise self._lie(f"the fd of its reply to GET_INFLIGHT_FD {problem}")
            region = InflightRegion(fd, got.mmap_size, got.mmap_offset, got.num_queues,
                                    got.queue_size)
        except BaseException:
            close_fds(fds)
            raise
        logger.info("%s: inflight region from the daemon: %s", self.label, region.describe())
        return region

    # -- teardown

    def _close_now(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        self._conn.close()

    @property
    def failure(self) -> str | None:
        """Why the front-end gave up on the daemon and closed the
        connection (a lie, a timeout, a lost connection), or None."""
        return self._failure

    async def wait_hangup(self) -> None:
        """Return when the daemon closes its end of the connection (it
        exited or crashed), even while no request is in flight; or when
        the front-end closed it (``failure`` then says why, unless it was
        ``aclose``)."""
        await self._conn.wait_hangup()

    async def aclose(self) -> None:
        """Close the socket and the back-end channel, and the inflight
        region unless it was taken out with ``take_inflight`` (take it
        first to keep it for the next connection). Idempotent."""
        self._close_now()
        region = self.take_inflight()
        if region is not None:
            region.close()
        await trio.lowlevel.checkpoint()


def _check_connect_args(default_num_queues: int, config_size: int) -> None:
    if not 1 <= default_num_queues <= MAX_RING_INDEX + 1:
        raise ValueError(f"default_num_queues {default_num_queues} is not in "
                         f"1..{MAX_RING_INDEX + 1}")
    if not 0 <= config_size <= MAX_CONFIG_SIZE:
        raise ValueError(f"config_size {config_size} is not in 0..{MAX_CONFIG_SIZE}")


def _check_handover(inflight: InflightRegion | None) -> None:
    """A region handed to a new connection must be open and held by no
    front-end (taken out with ``take_inflight``)."""
    if inflight is None:
        return
    if not isinstance(inflight, InflightRegion):
        raise TypeError(f"inflight must be an InflightRegion, not {type(inflight).__name__}")
    if inflight.closed:
        raise ValueError(f"the inflight region (fd {inflight.fd}) is closed")
    if inflight._custody.holder is not None:
        raise ValueError(f"the inflight region (fd {inflight.fd}) is still held by "
                         f"{inflight._custody.holder}; take it out with take_inflight() first")


def _inflight_fd_problem(fd: int, end: int) -> str | None:
    """What is wrong with ``fd`` as the memfd of an inflight region the
    daemon maps from offset 0 to ``end``, or None."""
    try:
        st = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"is {_fd_kind(fd, st.st_mode)}, not a memfd"
    if mode != os.O_RDWR:
        return "is not open for reading and writing"
    if st.st_size < end:
        return (f"is a file of {st.st_size} bytes, shorter than the {end} bytes (offset + "
                f"size) of the region")
    return None


def _fd_kind(fd: int, mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "not a regular file"
    return target if target.startswith("anon_inode:") else "not a regular file"


def _region_key(region: MemoryRegionFd) -> RegionKey:
    """What makes two regions the same mapping for the back-end: the same
    addresses and size, and the same open file at the same offset."""
    try:
        st = os.fstat(region.fd)
    except OSError as e:
        raise VhostUserError(f"memory region fd {region.fd} at gpa {region.gpa:#x}: "
                             f"{e.strerror}") from None
    return (region.gpa, region.size, region.user_addr, region.fd_offset, st.st_dev, st.st_ino)


def _flag_names(flags: ProtocolFeature) -> str:
    names = [f.name for f in ProtocolFeature if f & flags and f.name]
    return "|".join(names) or "none"
