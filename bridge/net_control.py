"""virtio-net over vhost-user: what the front-end does itself (virtio 1.2
section 5.1), as QEMU's virtio-net does for a vhost-user back-end.

A vhost-user net daemon (DPDK's vhost PMD) serves only the data rings:
receiveq N = ring 2N, transmitq N = ring 2N+1. Everything else is the
front-end's:

- config space: testpmd has none (no CONFIG protocol feature), so the
  bridge supplies struct virtio_net_config: the MAC (``mac=``), status
  VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs;
- the control virtqueue, the last queue (2 x max_virtqueue_pairs): the
  bridge reads the commands from guest memory and answers them
  (:class:`NetControl`, on a :class:`bridge.served_queue.ServedQueue`);
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET enables and disables ring pairs at the
  daemon with SET_VRING_ENABLE, as QEMU's virtio_net_set_queue_pairs does;
- which features the guest is offered (:func:`net_guest_features`).

GET_QUEUE_NUM of a net daemon counts queue *pairs* (QEMU's vhost-user net
compares it with its queues= of pairs; DPDK 22.11 answers 128, its
VHOST_MAX_QUEUE_PAIRS, whatever queues= the PMD was given), so the daemon
has twice that many rings; vhost-user addresses at most 256.

After a reset one pair is active (5.1.6.5.5: "the driver ... MUST ...
only the first queue pair is used by default"); the rings of the others are
started with the device but left disabled until VQ_PAIRS_SET.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable, Sequence

from bridge.served_queue import Chain, ServedQueue
from bridge.shadow_ring import RingError

# Feature bits (5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GSO = 6  # legacy only
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_F_RING_PACKED = 34

VIRTIO_NET_S_LINK_UP = 1

# Control commands (5.1.6.5): class, command.
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

MAX_RINGS = 256
"""vhost-user names a ring in 8 bits (SET_VRING_KICK/CALL)."""

DEFAULT_MAC = "52:54:00:12:34:56"
"""QEMU's default for a guest's first NIC (locally administered); a guest
with two net devices needs ``mac=`` for the second."""

# What the bridge does itself and so offers whatever the daemon says:
# MAC and STATUS (it supplies the config), CTRL_VQ (it serves the control
# queue) and CTRL_RX (promiscuous / all-multicast / MAC table commands are
# accepted and recorded; the spec calls them best-effort, "unwanted packets
# could still arrive", and frames go from the daemon into the guest's
# buffers without passing the bridge, so nothing is filtered: QEMU answers
# these the same way for a vhost back-end).
EMULATED = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_CTRL_RX)

# What the bridge does not offer even when the daemon does:
# - GSO (6): legacy, no meaning for a VERSION_1 device;
# - MTU (3): the bridge would have to tell the daemon with NET_SET_MTU
#   (protocol feature NET_MTU), which its front-end does not send; without
#   the bit the guest keeps its default of 1500, as with QEMU without host_mtu;
# - CTRL_GUEST_OFFLOADS (2): vhost-user has no message to change a running
#   daemon's receive offloads;
# - CTRL_VLAN (19), CTRL_RX_EXTRA (20), CTRL_MAC_ADDR (23): filters and a
#   MAC change the daemon would have to apply; nothing tells it;
# - GUEST_ANNOUNCE (21): the device asks the guest to announce itself after a
#   migration (VIRTIO_NET_S_ANNOUNCE); the bridge never migrates a guest, so
#   it would promise a status bit that never comes.
WITHHELD = (
    (1 << VIRTIO_NET_F_GSO) | (1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    | (1 << VIRTIO_NET_F_CTRL_VLAN) | (1 << VIRTIO_NET_F_CTRL_RX_EXTRA) | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
    | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
)

# 5.1.3.1: a feature the device offers without what it requires is one the
# driver must not accept; the bridge does not offer it.
_REQUIRES_ANY = {
    VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
    VIRTIO_NET_F_GUEST_UFO: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
    VIRTIO_NET_F_HOST_UFO: (VIRTIO_NET_F_CSUM,),
}

CONFIG = struct.Struct("<6sHH")
"""struct virtio_net_config up to max_virtqueue_pairs: mac, status, max_virtqueue_pairs."""

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; ValueError for anything else, or a
    multicast address (bit 0 of the first byte), which no NIC may have."""
    if not _MAC.match(text):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address; a NIC needs a unicast one")
    return mac


def net_guest_features(daemon_features: int, *, pairs: int) -> int:
    """The features the guest is offered, from the daemon's (already
    limited to what the bridge passes at all) and the pairs offered."""
    features = (daemon_features & ~WITHHELD) | EMULATED
    if pairs > 1:
        features |= 1 << VIRTIO_NET_F_MQ
    else:
        features &= ~(1 << VIRTIO_NET_F_MQ)
    for bit, needs in _REQUIRES_ANY.items():
        if features >> bit & 1 and not any(features >> need & 1 for need in needs):
            features &= ~(1 << bit)
    # The control queue is the bridge's, and it serves split rings only.
    return features & ~(1 << VIRTIO_F_RING_PACKED)


def net_config(mac: bytes, pairs: int) -> bytes:
    return CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP, pairs)


class NetControl:
    """The state the control commands change, and the answer to each.
    Pure: :meth:`command` takes the device-readable bytes of one chain and
    returns the ack plus, for VQ_PAIRS_SET, the number of pairs to run."""

    def __init__(self, max_pairs: int, features: int) -> None:
        self.max_pairs = max_pairs
        self.features = features
        """What the driver accepted."""
        self.pairs = 1
        self.promisc = True
        self.allmulti = False
        self.unicast: list[bytes] = []
        self.multicast: list[bytes] = []
        self.commands = 0

    def _has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def command(self, data: bytes, *, truncated: bool = False) -> tuple[int, int | None]:
        """(VIRTIO_NET_OK or VIRTIO_NET_ERR, pairs to run or None)."""
        self.commands += 1
        if len(data) < 2 or truncated:
            return VIRTIO_NET_ERR, None
        cls, cmd, body = data[0], data[1], data[2:]
        if cls == VIRTIO_NET_CTRL_RX and self._has(VIRTIO_NET_F_CTRL_RX):
            if cmd not in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI) or len(body) != 1:
                return VIRTIO_NET_ERR, None
            if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
                self.promisc = bool(body[0])
            else:
                self.allmulti = bool(body[0])
            return VIRTIO_NET_OK, None
        if cls == VIRTIO_NET_CTRL_MAC and cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET and self._has(VIRTIO_NET_F_CTRL_RX):
            tables = _mac_tables(body)
            if tables is None:
                return VIRTIO_NET_ERR, None
            self.unicast, self.multicast = tables
            return VIRTIO_NET_OK, None
        if cls == VIRTIO_NET_CTRL_MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and self._has(VIRTIO_NET_F_MQ):
            if len(body) != 2:
                return VIRTIO_NET_ERR, None
            (pairs,) = struct.unpack("<H", body)
            if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= min(self.max_pairs, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX):
                return VIRTIO_NET_ERR, None
            return VIRTIO_NET_OK, pairs
        # VLAN, ANNOUNCE, MAC_ADDR_SET, RSS, offloads, coalescing: not offered.
        return VIRTIO_NET_ERR, None


def _mac_tables(body: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """Two struct virtio_net_ctrl_mac (le32 entries, 6-byte MACs), back to
    back and nothing after; None if the sizes do not add up."""
    tables = []
    offset = 0
    for _ in range(2):
        if len(body) < offset + 4:
            return None
        (entries,) = struct.unpack_from("<I", body, offset)
        offset += 4
        end = offset + 6 * entries
        if end > len(body):
            return None
        tables.append([body[i:i + 6] for i in range(offset, end, 6)])
        offset = end
    if offset != len(body):
        return None
    return tables[0], tables[1]


EnableRings = Callable[[Sequence[int], bool], Awaitable[None]]
"""``await enable(ring_indices, enable)``: SET_VRING_ENABLE at the daemon."""


class NetEmulation:
    """One virtio-net device's front-end part: the pairs offered, the
    features, the config, and the control queue while the driver runs."""

    def __init__(self, mac: bytes, queue_pairs: int | None = None) -> None:
        self.mac = mac
        self.wanted_pairs = queue_pairs
        self.pairs = 1
        self.config = b""
        self.control: NetControl | None = None
        self.queue: ServedQueue | None = None

    @classmethod
    def from_options(cls, options) -> "NetEmulation":
        return cls(parse_mac(options.mac), options.queue_pairs)

    def setup(self, daemon_features: int, daemon_rings: int, *, daemon_mq: bool) -> tuple[int, int, bytes]:
        """(guest features, queues the guest sees, config) for a daemon with
        ``daemon_rings`` rings; ValueError when the daemon cannot back the
        pairs asked for."""
        daemon_pairs = min(daemon_rings, MAX_RINGS) // 2
        if daemon_pairs < 1:
            raise ValueError(f"the daemon has {daemon_rings} rings, not even one receive/transmit pair")
        if not daemon_mq or not daemon_features >> VIRTIO_NET_F_MQ & 1:
            daemon_pairs = 1
        if self.wanted_pairs is not None and self.wanted_pairs > daemon_pairs:
            raise ValueError(f"queue-pairs={self.wanted_pairs}, but the daemon serves at most {daemon_pairs} "
                             "queue pairs (GET_QUEUE_NUM, or 1 without MQ)")
        self.pairs = self.wanted_pairs or daemon_pairs
        self.config = net_config(self.mac, self.pairs)
        return self.offered_features(daemon_features), 2 * self.pairs + 1, self.config

    def offered_features(self, daemon_features: int) -> int:
        return net_guest_features(daemon_features, pairs=self.pairs)

    @property
    def daemon_rings(self) -> int:
        return 2 * self.pairs

    @staticmethod
    def daemon_features(driver_features: int, daemon_offered: int) -> int:
        """What SET_FEATURES tells the daemon: the driver's features that the
        daemon offered, less those the bridge does itself (QEMU's vhost-net
        acks a back-end only its data-path bits, never CTRL_VQ or CTRL_RX)."""
        return driver_features & daemon_offered & ~EMULATED

    @property
    def ctrl_queue(self) -> int:
        return 2 * self.pairs

    def is_served_here(self, index: int) -> bool:
        return index == self.ctrl_queue

    def active_pairs(self) -> int:
        return self.control.pairs if self.control is not None else 1

    def enabled_rings(self, started: Sequence[int]) -> list[int]:
        """The started rings of the active pairs: what SET_VRING_ENABLE(1)
        goes to at start."""
        return [i for i in started if i // 2 < self.active_pairs()]

    @staticmethod
    def needs_drain(index: int) -> bool:
        """Transmit rings are drained before a stop; receive rings hold the
        guest's empty buffers, which only incoming frames would use."""
        return index % 2 == 1

    def start(self, queue: ServedQueue | None, features: int) -> None:
        """DRIVER_OK: a new control state (one pair), serving ``queue``
        (None: the driver did not set the control queue up)."""
        self.control = NetControl(self.pairs, features)
        self.queue = queue

    def stop(self) -> None:
        self.control = None
        self.queue = None

    async def serve(self, enable: EnableRings) -> bool:
        """The guest kicked the control queue: answer every command it made
        available. Returns whether the guest wants an interrupt. RingError
        when the guest broke the ring."""
        queue, control = self.queue, self.control
        if queue is None or control is None:
            return False
        interrupt = False
        while True:
            chain = queue.pop()
            if chain is None:
                return interrupt
            ack = await self._answer(chain, control, enable)
            interrupt |= queue.push(chain, bytes([ack]))

    async def _answer(self, chain: Chain, control: NetControl, enable: EnableRings) -> int:
        if sum(length for _addr, length in chain.writable) < 1:
            # virtio_net_handle_ctrl: no room for the ack is a broken driver.
            raise RingError(f"control command (chain {chain.head}) has no device-writable byte for its ack")
        ack, pairs = control.command(chain.readable, truncated=chain.truncated)
        if pairs is not None and pairs != control.pairs:
            old = control.pairs
            if pairs > old:
                await enable(list(range(2 * old, 2 * pairs)), True)
            else:
                await enable(list(range(2 * pairs, 2 * old)), False)
            control.pairs = pairs
        return ack
