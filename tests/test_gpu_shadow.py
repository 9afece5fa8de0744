"""The virtio-gpu shadow layer (bridge/gpu_shadow.py) on a real shadow
virtqueue: the guest's control queue is written straight into a fake guest
RAM (tests.test_shadow_ring's fakes), and :class:`Gpu2d` serves the shadow
ring from the arena the way vhost-user-gpu's 2D path does (it maps each
ATTACH_BACKING entry through its memory table, which is the arena alone,
and copies the rows of each TRANSFER_TO_HOST_2D out of it). The real
daemon behind the real bridge is tests/test_e2e_gpu.py's."""

from __future__ import annotations

import struct

import pytest

from bridge.arena import Arena
from bridge.gpu_shadow import DEFAULT_HEADROOM, GpuShadow, transfer_ranges
from bridge.shadow_ring import ShadowVirtqueue
from tests.test_shadow_ring import ARENA_GPA, RAM_BASE, Daemon, Driver, GuestRam

CTRL_HDR = struct.Struct("<IIQIB3x")
MEM_ENTRY = struct.Struct("<QII")
CREATE_2D, UNREF, FLUSH, TRANSFER, ATTACH, DETACH = 0x101, 0x102, 0x104, 0x105, 0x106, 0x107
OK, ERR_UNSPEC, ERR_OOM, ERR_RESOURCE, ERR_PARAMETER = 0x1100, 0x1200, 0x1201, 0x1203, 0x1205
RAM_SIZE = 4 << 20
MiB = 1 << 20


class Gpu2d:
    """vhost-user-gpu's 2D command handling, over the shadow ring's arena."""

    def __init__(self, daemon: Daemon, arena: Arena) -> None:
        self.daemon = daemon
        self.arena = arena
        self.resources: dict[int, dict] = {}
        self.seen: list[bytes] = []  # every request, as the daemon read it

    def serve(self, *, hold: int = 0) -> list:
        """Pop every chain, answer all but the last ``hold`` (returned)."""
        chains = self.daemon.pop()
        held = chains[len(chains) - hold:] if hold else []
        for chain in chains[:len(chains) - hold]:
            self.answer(chain)
        return held

    def answer(self, chain, code: int | None = None) -> None:
        request = self.daemon.read(chain)
        self.seen.append(request)
        if code is None:
            code = self.process(request)
        resp = CTRL_HDR.pack(code, 0, 0, 0, 0)
        self.daemon.fill(chain, resp)
        self.daemon.complete(chain.head, len(resp))

    def process(self, req: bytes) -> int:
        cmd = CTRL_HDR.unpack_from(req)[0]
        body = req[CTRL_HDR.size:]
        if len(body) < {CREATE_2D: 16, ATTACH: 8, DETACH: 8, UNREF: 8, TRANSFER: 32}.get(cmd, 0):
            return ERR_UNSPEC  # VUGPU_FILL_CMD: command size incorrect
        if cmd == CREATE_2D:
            rid, fmt, w, h = struct.unpack_from("<IIII", body)
            if rid in self.resources:
                return ERR_RESOURCE
            self.resources[rid] = {"w": w, "h": h, "image": bytearray(w * h * 4), "iov": None}
            return OK
        if cmd == ATTACH:
            rid, count = struct.unpack_from("<II", body)
            res = self.resources.get(rid)
            if res is None:
                return ERR_RESOURCE
            iov = []
            for i in range(count):
                addr, length, _ = MEM_ENTRY.unpack_from(body, 8 + i * 16)
                off = addr - ARENA_GPA
                if not (0 <= off and off + length <= self.arena.size):
                    return ERR_UNSPEC  # vu_gpa_to_va finds no region
                iov.append((off, length))
            res["iov"] = iov
            return OK
        if cmd in (DETACH, UNREF):
            (rid,) = struct.unpack_from("<I", body)
            res = self.resources.get(rid)
            if res is None or (cmd == DETACH and res["iov"] is None):
                return ERR_RESOURCE
            if cmd == UNREF:
                del self.resources[rid]
            else:
                res["iov"] = None
            return OK
        if cmd == TRANSFER:
            x, y, w, h, offset, rid, _ = struct.unpack_from("<IIIIQII", body)
            res = self.resources.get(rid)
            if res is None or res["iov"] is None:
                return ERR_RESOURCE
            if x + w > res["w"] or y + h > res["h"]:
                return ERR_PARAMETER
            stride = res["w"] * 4
            backing = b"".join(bytes(self.arena.buf[o:o + n]) for o, n in res["iov"])
            if offset or x or y or w != res["w"]:
                for r in range(h):
                    src = (offset + stride * r) & 0xFFFFFFFF
                    dst = (y + r) * stride + x * 4
                    row = backing[src:src + w * 4]
                    res["image"][dst:dst + len(row)] = row
            else:
                whole = backing[:stride * res["h"]]
                res["image"][:len(whole)] = whole
            return OK
        return ERR_UNSPEC


class Rig:
    """A control queue with the gpu layer, a guest driver and the daemon."""

    def __init__(self, *, arena_size: int = 4 * MiB, headroom: int = 64 << 10, num: int = 16,
                 layer=GpuShadow) -> None:
        self.ram = GuestRam(size=RAM_SIZE)
        self.drv = Driver(self.ram, num)
        self.arena = Arena(arena_size)
        self.gpu_layer = layer(self.ram, self.arena, ARENA_GPA, headroom=headroom)
        self.svq = ShadowVirtqueue(guest=self.ram, ring=self.drv.ring, arena=self.arena, arena_gpa=ARENA_GPA,
                                   event_idx=False, indirect=False, hook=self.gpu_layer)
        self.gpu = Gpu2d(Daemon(self.svq, self.arena), self.arena)
        self.answers: dict[int, int] = {}  # guest head -> response gpa

    def send(self, cmd: int, body: bytes = b"", extra: bytes = b"", *, flags: int = 0, fence: int = 0,
             resp: int = CTRL_HDR.size) -> int:
        """Put one command in the guest's ring (not kicked): its head."""
        out = [self.drv.buffer(CTRL_HDR.pack(cmd, flags, fence, 0, 0) + body)]
        if extra:
            out.append(self.drv.buffer(extra))
        into = [self.drv.buffer(resp, fill=0)] if resp else []
        head = self.drv.add(out, into)
        if into:
            self.answers[head] = into[0][0]
        return head

    def kick(self) -> bool:
        """The guest's kick: returns whether the guest got an interrupt for
        chains answered without the daemon."""
        self.svq.guest_kicked()
        return self.svq.take_interrupt()

    def round(self, *, hold: int = 0) -> list:
        self.kick()
        held = self.gpu.serve(hold=hold)
        self.svq.daemon_called()
        return held

    def responses(self) -> dict[int, tuple[int, int]]:
        """guest head -> (response type, used len), for the new used elements."""
        out = {}
        for head, used_len in self.drv.used_elems():
            gpa = self.answers.pop(head, None)
            out[head] = (CTRL_HDR.unpack(self.ram.peek(gpa, CTRL_HDR.size))[0] if gpa and used_len else None,
                         used_len)
        return out

    def command(self, cmd: int, body: bytes = b"", extra: bytes = b"", **kwargs) -> int:
        """Send, serve, and return the response type."""
        head = self.send(cmd, body, extra, **kwargs)
        self.round()
        return self.responses()[head][0]

    def create(self, rid: int, w: int, h: int) -> int:
        """A resource with one backing allocation in guest RAM: its gpa."""
        assert self.command(CREATE_2D, struct.pack("<IIII", rid, 2, w, h)) == OK
        gpa, _ = self.drv.buffer(bytes(w * h * 4))
        return gpa

    def attach(self, rid: int, entries: list[tuple[int, int]], count: int | None = None) -> int:
        count = len(entries) if count is None else count
        extra = b"".join(MEM_ENTRY.pack(a, n, 0) for a, n in entries)
        return self.command(ATTACH, struct.pack("<II", rid, count), extra)

    def transfer(self, rid: int, w: int, x: int, y: int, tw: int, th: int) -> int:
        return self.command(TRANSFER, struct.pack("<IIIIQII", x, y, tw, th, y * w * 4 + x * 4, rid, 0))

    def close(self) -> None:
        self.svq.close()
        assert self.arena.allocation_count == 0 and self.gpu_layer.backings == 0
        self.arena.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def pixels(w: int, h: int, seed: int) -> bytes:
    return bytes((seed * 37 + i * 11) & 0xFF for i in range(w * h * 4))


def attach_whole(rig: Rig, rid: int, w: int, h: int, *, pages: bool = True) -> int:
    """Create ``rid`` and attach its backing, page by page (as Linux's
    scatter list does) or as one entry: the backing's gpa."""
    gpa = rig.create(rid, w, h)
    size = w * h * 4
    entries = [(gpa + o, min(4096, size - o)) for o in range(0, size, 4096)] if pages else [(gpa, size)]
    assert rig.attach(rid, entries) == OK
    return gpa


# -- the copies -------------------------------------------------------------------------------


def test_attach_gives_the_daemon_one_arena_entry_and_no_guest_address(rig):
    gpa = rig.create(1, 64, 16)
    image = pixels(64, 16, 1)
    rig.ram.poke(gpa, image)
    entries = [(gpa + o, 4096) for o in range(0, 64 * 16 * 4, 4096)]
    assert rig.attach(1, entries) == OK
    request = rig.gpu.seen[-1]
    rid, count = struct.unpack_from("<II", request, CTRL_HDR.size)
    assert (rid, count) == (1, 1)
    addr, length, _ = MEM_ENTRY.unpack_from(request, CTRL_HDR.size + 8)
    assert ARENA_GPA <= addr and addr + length <= ARENA_GPA + rig.arena.size and length == len(image)
    assert request[CTRL_HDR.size + 8 + 16:] == bytes(16 * (len(entries) - 1))  # the guest's entries zeroed
    for a, _ in entries:
        assert struct.pack("<Q", a) not in request
    # what the daemon maps holds what the guest had drawn
    off = addr - ARENA_GPA
    assert bytes(rig.arena.buf[off:off + length]) == image
    assert rig.gpu_layer.backings == 1 and rig.gpu_layer.backing_bytes == len(image)


def test_a_transfer_after_the_guest_redrew_shows_the_new_pixels(rig):
    w, h = 64, 32
    gpa = attach_whole(rig, 1, w, h)
    first = pixels(w, h, 1)
    rig.ram.poke(gpa, first)
    assert rig.transfer(1, w, 0, 0, w, h) == OK
    assert rig.gpu.resources[1]["image"] == first
    second = pixels(w, h, 2)
    rig.ram.poke(gpa, second)
    assert rig.transfer(1, w, 0, 0, w, h) == OK
    assert rig.gpu.resources[1]["image"] == second


def test_a_partial_transfer_copies_just_its_rows(rig):
    w, h = 64, 32
    gpa = attach_whole(rig, 1, w, h)
    base = pixels(w, h, 1)
    rig.ram.poke(gpa, base)
    assert rig.transfer(1, w, 0, 0, w, h) == OK
    # The guest redraws everything but transfers a 10x5 rectangle at (7, 3).
    redrawn = pixels(w, h, 9)
    rig.ram.poke(gpa, redrawn)
    copied = rig.gpu_layer.bytes_copied
    assert rig.transfer(1, w, 7, 3, 10, 5) == OK
    assert rig.gpu_layer.bytes_copied - copied == 10 * 5 * 4
    expected = bytearray(base)
    for r in range(3, 8):
        expected[(r * w + 7) * 4:(r * w + 17) * 4] = redrawn[(r * w + 7) * 4:(r * w + 17) * 4]
    assert rig.gpu.resources[1]["image"] == expected


def test_transfer_ranges_follow_the_daemons_reads():
    # full width at offset 0: the daemon copies the whole image, whatever the height
    assert transfer_ranges((10, 4), 0, 0, 10, 1, 0, 160) == [(0, 160)]
    # full-width rows lower down are contiguous: one range
    assert transfer_ranges((10, 4), 0, 1, 10, 2, 40, 160) == [(40, 80)]
    # a rectangle: one range a row, stride apart
    assert transfer_ranges((10, 4), 2, 1, 3, 2, 48, 160) == [(48, 12), (88, 12)]
    # rows past the backing are cut, a rectangle outside the resource reads nothing
    assert transfer_ranges((10, 4), 2, 1, 3, 2, 48, 95) == [(48, 12), (88, 7)]
    assert transfer_ranges((10, 4), 8, 0, 3, 1, 32, 160) == []
    # the daemon's src_offset is 32 bits
    assert transfer_ranges((10, 4), 1, 0, 2, 2, (1 << 32) + 4, 160) == [(4, 8), (44, 8)]
    # unknown resource: all of the backing
    assert transfer_ranges(None, 1, 1, 1, 1, 44, 160) == [(0, 160)]


def test_a_transfer_before_the_attach_is_answered_copies_into_the_backing_the_daemon_will_hold(rig):
    w, h = 16, 8
    gpa = rig.create(1, w, h)
    rig.ram.poke(gpa, pixels(w, h, 1))
    rig.send(ATTACH, struct.pack("<II", 1, 1), MEM_ENTRY.pack(gpa, w * h * 4, 0))
    rig.kick()  # published, not yet served
    rig.ram.poke(gpa, pixels(w, h, 2))
    rig.send(TRANSFER, struct.pack("<IIIIQII", 0, 0, w, h, 0, 1, 0))
    rig.round()
    assert [t for t, _ in rig.responses().values()] == [OK, OK]
    assert rig.gpu.resources[1]["image"] == pixels(w, h, 2)


def test_the_request_is_taken_from_the_guest_not_from_the_arena_the_daemon_can_write():
    """A daemon that rewrites the arena under the bridge cannot make it copy
    guest RAM of its choosing into a backing."""
    secret_gpa = RAM_BASE + 0x200000

    class Raced(GpuShadow):
        def before_publish(self, chain):
            attach = struct.unpack("<I", chain.read(0, 4))[0] == ATTACH
            for pos, n, w in chain._pieces:  # the daemon scribbles on the entries
                if attach and not w and n == MEM_ENTRY.size:
                    self.arena.buf[pos:pos + MEM_ENTRY.size] = MEM_ENTRY.pack(secret_gpa, 1024, 0)
            return super().before_publish(chain)

    rig = Rig(layer=Raced)
    try:
        rig.ram.poke(secret_gpa, b"secret!!" * 128)
        gpa = rig.create(1, 16, 16)
        rig.ram.poke(gpa, pixels(16, 16, 3))
        assert rig.attach(1, [(gpa, 1024)]) == OK
        assert rig.transfer(1, 16, 0, 0, 16, 16) == OK
        assert rig.gpu.resources[1]["image"] == pixels(16, 16, 3)
        assert b"secret!!" not in bytes(rig.arena.buf)
    finally:
        rig.close()


# -- freeing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [DETACH, UNREF])
def test_detach_and_unref_free_the_copy_once_the_daemon_returned_them(rig, cmd):
    attach_whole(rig, 1, 32, 32)
    assert rig.gpu_layer.backings == 1
    rig.send(cmd, struct.pack("<II", 1, 0))
    (held,) = rig.round(hold=1)
    assert rig.gpu_layer.backings == 1  # the daemon may still read it
    rig.gpu.answer(held)
    rig.svq.daemon_called()
    assert [t for t, _ in rig.responses().values()] == [OK]
    assert rig.gpu_layer.backings == 0 and rig.arena.allocation_count == 0
    # a transfer now copies nothing and the daemon refuses it
    copied = rig.gpu_layer.bytes_copied
    assert rig.transfer(1, 32, 0, 0, 32, 32) == ERR_RESOURCE
    assert rig.gpu_layer.bytes_copied == copied


def test_a_refused_attach_frees_its_copy(rig):
    gpa, _ = rig.drv.buffer(4096)
    assert rig.attach(7, [(gpa, 4096)]) == ERR_RESOURCE  # no resource 7 at the daemon
    assert rig.gpu_layer.backings == 0 and rig.arena.allocation_count == 0


def test_a_second_attach_replaces_the_first_copy(rig):
    attach_whole(rig, 1, 16, 16)
    other, _ = rig.drv.buffer(16 * 16 * 4)
    assert rig.attach(1, [(other, 16 * 16 * 4)]) == OK
    assert rig.gpu_layer.backings == 1


def test_a_reset_frees_every_copy_even_with_commands_in_flight(rig):
    attach_whole(rig, 1, 32, 32)
    gpa = rig.create(2, 32, 32)
    rig.send(ATTACH, struct.pack("<II", 2, 1), MEM_ENTRY.pack(gpa, 32 * 32 * 4, 0))
    rig.kick()
    assert rig.gpu_layer.backings == 2 and rig.svq.in_flight == 1
    rig.svq.reset()
    assert rig.gpu_layer.backings == 0 and rig.arena.allocation_count == 0


def test_answers_in_any_order_free_each_copy_once(rig):
    """A daemon that answers a DETACH before the ATTACH before it: no copy
    is freed twice or written after it was freed."""
    gpa = rig.create(1, 16, 16)
    rig.send(ATTACH, struct.pack("<II", 1, 1), MEM_ENTRY.pack(gpa, 1024, 0))
    rig.send(DETACH, struct.pack("<II", 1, 0))
    rig.kick()
    attach, detach = rig.gpu.daemon.pop()
    rig.gpu.answer(detach, OK)
    rig.gpu.answer(attach, OK)
    rig.svq.daemon_called()
    assert rig.gpu_layer.backings == 0 and rig.arena.allocation_count == 0
    assert rig.transfer(1, 16, 0, 0, 16, 16) == ERR_RESOURCE


# -- bounds and malformed commands --------------------------------------------------------------


def bridge_answered(rig: Rig, head: int, code: int) -> None:
    """The guest got ``code`` for ``head`` from the bridge: the daemon never
    saw the command and the guest was interrupted."""
    assert rig.kick() is True
    assert rig.gpu.daemon.pop() == []
    assert rig.responses() == {head: (code, CTRL_HDR.size)}


def test_a_backing_larger_than_the_arena_is_out_of_memory_answered_by_the_bridge():
    rig = Rig(arena_size=1 * MiB)
    try:
        rig.create(1, 16, 16)
        head = rig.send(ATTACH, struct.pack("<II", 1, 1), MEM_ENTRY.pack(RAM_BASE + 0x10000, 2 * MiB, 0),
                        flags=1, fence=77)
        assert rig.kick() is True
        assert rig.gpu.daemon.pop() == []
        (head_, used_len), = rig.drv.used_elems()
        assert head_ == head and used_len == CTRL_HDR.size
        assert CTRL_HDR.unpack(rig.ram.peek(rig.answers[head], CTRL_HDR.size)) == (ERR_OOM, 1, 77, 0, 0)  # fenced
        assert rig.arena.allocation_count == 0
    finally:
        rig.close()


def test_an_arena_full_of_backings_answers_out_of_memory_instead_of_waiting():
    rig = Rig(arena_size=1 * MiB, headroom=DEFAULT_HEADROOM)
    try:
        # 192 KiB each: two and the headroom fit in 1 MiB, three do not
        attach_whole(rig, 1, 256, 192, pages=False)
        attach_whole(rig, 2, 256, 192, pages=False)
        gpa = rig.create(3, 256, 192)
        head = rig.send(ATTACH, struct.pack("<II", 3, 1), MEM_ENTRY.pack(gpa, 256 * 192 * 4, 0))
        bridge_answered(rig, head, ERR_OOM)
        # once one is unreferenced, it fits
        assert rig.command(UNREF, struct.pack("<II", 1, 0)) == OK
        assert rig.attach(3, [(gpa, 256 * 192 * 4)]) == OK
    finally:
        rig.close()


def test_an_attach_waits_while_requests_in_flight_hold_the_space():
    rig = Rig(arena_size=1 * MiB, headroom=DEFAULT_HEADROOM)
    try:
        attach_whole(rig, 1, 256, 128, pages=False)
        gpa = rig.create(2, 256, 128)
        rig.create(3, 64, 64)
        # a big request held by the daemon takes the room the attach needs
        rig.send(CREATE_2D, struct.pack("<IIII", 9, 2, 1, 1) + bytes(300 << 10))
        (held,) = rig.round(hold=1)
        head = rig.send(ATTACH, struct.pack("<II", 2, 1), MEM_ENTRY.pack(gpa, 256 * 128 * 4, 0))
        assert rig.kick() is False
        assert rig.svq.waiting == 1 and rig.gpu.daemon.pop() == []
        rig.gpu.answer(held)
        rig.svq.daemon_called()  # space back: the attach goes out
        rig.gpu.serve()
        rig.svq.daemon_called()
        assert rig.responses()[head] == (OK, CTRL_HDR.size)
        assert rig.gpu_layer.backings == 2
    finally:
        rig.close()


@pytest.mark.parametrize("case", ["count overflows the request", "zero entries", "too many entries",
                                  "empty entry", "outside RAM", "wraps", "in a hole"])
def test_malformed_attach_is_answered_by_the_bridge_and_nothing_is_lost(case):
    rig = Rig()
    rig.ram.holes.append((RAM_BASE + 0x300000, 0x1000))
    try:
        gpa = attach_whole(rig, 1, 16, 16)
        rig.create(2, 16, 16)
        # a command in flight at the daemon before the bad one
        rig.send(TRANSFER, struct.pack("<IIIIQII", 0, 0, 16, 16, 0, 1, 0))
        (held,) = rig.round(hold=1)
        good, _ = rig.drv.buffer(1024)
        entries, count = {
            "count overflows the request": ([(good, 1024)], 3),
            "zero entries": ([], 0),
            "too many entries": ([(good, 1024)], 16385),
            "empty entry": ([(good, 512), (good + 512, 0)], None),
            "outside RAM": ([(good, 512), (RAM_BASE + RAM_SIZE - 16, 32)], None),
            "wraps": ([((1 << 64) - 16, 32)], None),
            "in a hole": ([(RAM_BASE + 0x300000 - 64, 128)], None),
        }[case]
        count = len(entries) if count is None else count
        head = rig.send(ATTACH, struct.pack("<II", 2, count), b"".join(MEM_ENTRY.pack(a, n, 0) for a, n in entries))
        bridge_answered(rig, head, ERR_PARAMETER)
        assert rig.gpu_layer.backings == 1 and rig.arena.allocation_count == 2  # resource 1's, the held chain's
        # the command before it completes, and the queue goes on
        rig.gpu.answer(held)
        rig.svq.daemon_called()
        assert [t for t, _ in rig.responses().values()] == [OK]
        rig.ram.poke(gpa, pixels(16, 16, 5))
        assert rig.transfer(1, 16, 0, 0, 16, 16) == OK
        assert rig.gpu.resources[1]["image"] == pixels(16, 16, 5)
        assert rig.attach(2, [(good, 1024)]) == OK
        assert rig.svq.broken is None
    finally:
        rig.close()


def test_a_transfer_whose_backing_left_guest_ram_is_answered_by_the_bridge(rig):
    gpa = attach_whole(rig, 1, 16, 16)
    rig.ram.holes.append((gpa, 1024))  # ballooned out, a grant ended
    head = rig.send(TRANSFER, struct.pack("<IIIIQII", 0, 0, 16, 16, 0, 1, 0))
    bridge_answered(rig, head, ERR_PARAMETER)
    rig.ram.holes.clear()
    assert rig.transfer(1, 16, 0, 0, 16, 16) == OK


def test_a_response_buffer_too_small_for_a_header_gets_what_fits(rig):
    head = rig.send(ATTACH, struct.pack("<II", 1, 0), resp=8)
    rig.kick()
    assert rig.drv.used_elems() == [(head, 8)]
    assert struct.unpack("<I", rig.ram.peek(rig.answers.pop(head), 4))[0] == ERR_PARAMETER


def test_other_commands_and_short_requests_pass_unchanged(rig):
    flush = CTRL_HDR.pack(FLUSH, 0, 0, 0, 0) + struct.pack("<IIIIII", 0, 0, 1, 1, 1, 0)
    assert rig.command(FLUSH, flush[CTRL_HDR.size:]) == ERR_UNSPEC  # the fake has no flush
    assert rig.gpu.seen[-1] == flush
    # an ATTACH too short to hold its own body goes to the daemon as it is
    assert rig.command(ATTACH, b"\1\0") == ERR_UNSPEC
    assert rig.gpu.seen[-1] == CTRL_HDR.pack(ATTACH, 0, 0, 0, 0) + b"\1\0"
    assert rig.gpu_layer.backings == 0
