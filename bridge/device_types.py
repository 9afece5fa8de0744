"""The virtio device types the bridge knows by name, and which feature bits
it passes between the guest and the daemon.

The daemon defines the device: its features, queue count and config space
come from vhost-user. What the bridge adds per type is only what vhost-user
cannot tell: the virtio device id the guest sees, how many bytes of config
space to ask for, how many queues to assume when the daemon does not offer
MQ, which config fields a driver may write, and, for a daemon that has no
config space to give (virtiofsd), the config the front-end supplies, as
QEMU's vhost-user-fs device does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs

from bridge.net_control import DEFAULT_MAC, NetEmulation
from vhost_user.protocol import MAX_CONFIG_SIZE


@attrs.frozen
class DeviceOptions:
    """What the user says about a device beyond its daemon (CLI flags)."""

    fs_tag: str = "fs0"
    """virtio-fs: the tag the guest mounts (mount -t virtiofs TAG DIR)."""
    mac: str = DEFAULT_MAC
    """virtio-net: the MAC address in the config space the bridge supplies."""
    queue_pairs: int | None = None
    """virtio-net: receive/transmit pairs offered (None: all the daemon has)."""
    gpu_resolution: tuple[int, int] = (1024, 768)
    """virtio-gpu: the display mode offered (GET_DISPLAY_INFO, EDID)."""
    gpu_output: str | None = None
    """virtio-gpu: where PNG snapshots go (None: no PNGs)."""
    gpu_png_every_flush: bool = False
    """virtio-gpu: write a PNG for every frame the daemon presents."""
    gpu_cursor: bool = False
    """virtio-gpu: draw the cursor into the PNGs."""
    gpu_http: tuple[str, int] | None = None
    """virtio-gpu: serve a live view on this loopback address."""


VIRTIO_FS_TAG_SIZE = 36


def virtio_fs_config(options: DeviceOptions, num_queues: int) -> bytes:
    """struct virtio_fs_config: char tag[36] (NUL-padded, no terminator
    needed), le32 num_request_queues (every queue but hiprio)."""
    tag = options.fs_tag.encode()
    if not 0 < len(tag) <= VIRTIO_FS_TAG_SIZE:
        raise ValueError(f"a virtio-fs tag is 1 to {VIRTIO_FS_TAG_SIZE} bytes, not {len(tag)}")
    return tag.ljust(VIRTIO_FS_TAG_SIZE, b"\0") + struct.pack("<I", max(1, num_queues - 1))


GPU_NUM_SCANOUTS = 1


def virtio_gpu_config(daemon_config: bytes) -> bytes:
    """struct virtio_gpu_config: le32 events_read, events_clear,
    num_scanouts, num_capsets. vhost-user-gpu leaves num_scanouts 0: QEMU's
    front-end owns it and the events (hw/display/vhost-user-gpu.c), and the
    bridge, which has one display per device, says 1. num_capsets is the
    daemon's (0 without virgl)."""
    capsets = struct.unpack_from("<I", daemon_config, 12)[0] if len(daemon_config) >= 16 else 0
    return struct.pack("<IIII", 0, 0, GPU_NUM_SCANOUTS, capsets)


@attrs.frozen
class DeviceType:
    name: str
    virtio_id: int
    config_size: int | None
    """Bytes of config space to read with GET_CONFIG (0: the daemon has
    none; None: as many as the daemon answers, found by asking)."""
    default_num_queues: int
    """Queues when the daemon does not negotiate MQ."""
    max_queues: int | None = None
    """The most queues the guest sees, whatever GET_QUEUE_NUM says (None:
    all the daemon offers)."""
    writable_config: tuple[tuple[int, int], ...] = ()
    """(offset, length) of the config fields a driver may write; the
    bridge refuses other config writes instead of passing them on
    (libvhost-user daemons panic on a SET_CONFIG they do not expect)."""

    supplied_config: Callable[[DeviceOptions, int], bytes] | None = None
    """The config space the bridge gives the guest itself, from the options
    and the daemon's queue count (for daemons without a config space)."""

    config_overlay: Callable[[bytes, DeviceOptions], bytes] | None = None
    """The daemon's config space as the guest sees it, with the fields the
    front-end manages filled in (virtio-gpu: num_scanouts and the events,
    as QEMU's vhost-user-gpu device does)."""

    emulation: Callable[[DeviceOptions], Any] | None = None
    """The part of the device the bridge does itself, beyond the daemon's
    rings (virtio-net: config, features, the control queue; see
    bridge.net_control.NetEmulation)."""
    rings_per_queue: int = 1
    """Rings per queue that GET_QUEUE_NUM counts (net daemons count pairs)."""

    def config_write_allowed(self, offset: int, size: int) -> bool:
        return any(start <= offset and offset + size <= start + length for start, length in self.writable_config)


DEVICE_TYPES: dict[str, DeviceType] = {
    # struct virtio_blk_config up to write_zeroes_may_unmap: 60 bytes, the
    # size QEMU's vhost-user-blk front-end asks for.
    # Only 'writeback' (offset 32, with VIRTIO_BLK_F_CONFIG_WCE) is the
    # driver's to write.
    "blk": DeviceType("blk", virtio_id=2, config_size=60, default_num_queues=1, writable_config=((32, 1),)),
    # virtiofsd has no config space (no CONFIG protocol feature): the
    # front-end supplies the tag, as QEMU's vhost-user-fs-pci does. Queue 0
    # is hiprio, the rest carry requests.
    "fs": DeviceType("fs", virtio_id=26, config_size=0, default_num_queues=2, supplied_config=virtio_fs_config),
    # vhost-user-gpu (2D): control and cursor queues; it answers GET_CONFIG
    # only up to sizeof(struct virtio_gpu_config) = 16 bytes (events_read,
    # events_clear, num_scanouts, num_capsets), and the driver writes only
    # events_clear. Its frames come over the display channel
    # (vhost_user.gpu_display), which the device opens at DRIVER_OK.
    "gpu": DeviceType("gpu", virtio_id=16, config_size=16, default_num_queues=2, writable_config=((4, 4),),
                      config_overlay=lambda config, options: virtio_gpu_config(config)),
    # testpmd's vhost PMD has no config space and serves only the data
    # rings: the bridge supplies the config and serves the control queue
    # (bridge.net_control), as QEMU's virtio-net does for vhost-user.
    "net": DeviceType("net", virtio_id=1, config_size=0, default_num_queues=2, emulation=NetEmulation.from_options,
                      rings_per_queue=2),
    # Any other device: see generic_device_type.
}

GENERIC = "generic"
"""The --device name of a daemon the bridge has no name for (--device-id N)."""
MAX_VIRTIO_ID = 0xFFFF  # virtio-mmio DeviceID is 32 bits; ids are assigned below 64


def generic_device_type(virtio_id: int, *, queues: int | None = None, config_size: int | None = None) -> DeviceType:
    """A device the bridge has no name for (``--device-id N``): everything
    comes from the daemon, as with QEMU's vhost-user-device.

    The queue count is GET_QUEUE_NUM's (``queues`` when the daemon does not
    offer MQ, and at most ``queues`` when given); the config space is as
    long as the daemon answers GET_CONFIG (``config_size`` to say it). The
    guest may not write the config space: the bridge cannot know which
    fields a driver may write, and libvhost-user daemons abort on a
    SET_CONFIG they do not expect; QEMU's generic device passes no config
    writes either."""
    if not 1 <= virtio_id <= MAX_VIRTIO_ID:
        raise ValueError(f"virtio device id {virtio_id} is not in 1..{MAX_VIRTIO_ID}")
    if queues is not None and not 1 <= queues <= 0x8000:
        raise ValueError(f"{queues} queues is not in 1..32768")
    if config_size is not None and not 0 <= config_size <= MAX_CONFIG_SIZE:
        raise ValueError(f"a config space of {config_size} bytes is not in 0..{MAX_CONFIG_SIZE}")
    known = {t.virtio_id: t.name for t in DEVICE_TYPES.values()}.get(virtio_id)
    return DeviceType(
        f"generic-{virtio_id}" + (f" ({known})" if known else ""),
        virtio_id=virtio_id,
        config_size=config_size,
        default_num_queues=queues or 1,
        max_queues=queues,
    )


# Transport feature bits (virtio 1.2 section 6) the bridge lets through from
# the daemon to the guest. Device-specific bits 0-23 always pass; of the
# rest, only what a vhost-user daemon implements on its own rings:
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_RING_RESET = 40

DEVICE_SPECIFIC_MASK = (1 << 24) - 1
PASSED_TRANSPORT_FEATURES = (
    (1 << VIRTIO_F_INDIRECT_DESC)
    | (1 << VIRTIO_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_RING_PACKED)
    | (1 << VIRTIO_F_IN_ORDER)
)
# Left out on purpose: NOTIFY_ON_EMPTY (24) and ANY_LAYOUT (27) are legacy;
# LOG_ALL (26) and PROTOCOL_FEATURES (30) are vhost-user's own;
# ACCESS_PLATFORM (33) would mean an IOMMU the bridge does not emulate;
# NOTIFICATION_DATA (38) carries data that a kick eventfd cannot.


def guest_features(daemon_features: int) -> int:
    """The features the device offers the guest, given the daemon's."""
    return daemon_features & (DEVICE_SPECIFIC_MASK | PASSED_TRANSPORT_FEATURES)
