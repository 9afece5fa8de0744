"""Split virtqueue layout (virtio 1.2 section 2.7): sizes, offsets, flags.

Pure arithmetic on little-endian ring memory, for whoever builds or walks a
ring: the simulated guest's drivers today, shadow rings later.

    struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; }   16 bytes
    struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }
    struct virtq_used  { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N];
                         le16 avail_event; }
"""

from __future__ import annotations

import struct

MAX_QUEUE_SIZE = 32768

DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Alignment the spec requires of each part (2.7, "Virtqueue Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")


def is_valid_queue_size(num: int) -> bool:
    """Split queues have a power-of-two size of at most 32768."""
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 2 + 2 + 2 * num + 2


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] of 8-byte elements, avail_event."""
    return 2 + 2 + 8 * num + 2


# Offsets inside the avail ring.
AVAIL_FLAGS = 0
AVAIL_IDX = 2


def avail_ring_entry(i: int) -> int:
    return 4 + 2 * i


def used_event_offset(num: int) -> int:
    return 4 + 2 * num


# Offsets inside the used ring.
USED_FLAGS = 0
USED_IDX = 2


def used_ring_entry(i: int) -> int:
    return 4 + 8 * i


def avail_event_offset(num: int) -> int:
    return 4 + 8 * num


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The EVENT_IDX test (2.7.10): notify if event_idx lies in [old, new)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
