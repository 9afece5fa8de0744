"""The vhost-user-gpu display channel (vhost_user.gpu_display) against a
fake daemon on the other end of a socketpair, sending the messages of
QEMU's vhost-user-gpu.rst as written out here; and the EDID it gives."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
import trio

from bridge.frame_sink import FrameSink
from vhost_user import edid
from vhost_user.gpu_display import GpuDisplayServer

HDR = struct.Struct("=III")
REPLY = 0x4


class Daemon:
    """The daemon's end: send requests (flags 0, as vhost-user-gpu does), read replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)

    async def send(self, request: int, payload: bytes = b"", fd: int | None = None) -> None:
        data = HDR.pack(request, 0, len(payload)) + payload
        anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        sent = await self.sock.sendmsg([data], anc)
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    async def recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    async def reply(self, request: int) -> bytes:
        req, flags, size = HDR.unpack(await self.recv_exactly(12))
        assert (req, flags) == (request, REPLY)
        return await self.recv_exactly(size) if size else b""

    async def closed(self) -> bool:
        """Whether the other end closed (unread bytes make that a reset)."""
        try:
            return await self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


class Scene:
    def __init__(self, nursery, *, width=1024, height=768, sink=None, timeout=5.0):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.errors: list[str] = []
        self.sink = sink or FrameSink()
        self.server = GpuDisplayServer(ours, self.sink, width=width, height=height, label="fake",
                                       timeout=timeout, on_error=self.errors.append)
        self.daemon = Daemon(theirs)
        self.nursery = nursery

    async def start(self):
        await self.nursery.start(self.server.run)
        return self


def parse_edid(block: bytes) -> dict:
    """Independent reading of an EDID 1.4 base block."""
    assert len(block) == 128
    assert block[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
    assert sum(block) % 256 == 0
    assert (block[18], block[19]) == (1, 4)
    dtd = block[54:72]
    clock = int.from_bytes(dtd[0:2], "little") * 10_000
    h_active = dtd[2] | (dtd[4] >> 4) << 8
    h_blank = dtd[3] | (dtd[4] & 0xF) << 8
    v_active = dtd[5] | (dtd[7] >> 4) << 8
    v_blank = dtd[6] | (dtd[7] & 0xF) << 8
    tags = [block[o + 3] for o in (72, 90, 108) if block[o:o + 3] == b"\0\0\0"]
    name = b""
    for o in (72, 90, 108):
        if block[o:o + 4] == b"\0\0\0\xfc":
            name = block[o + 5:o + 18].split(b"\n")[0]
    return {"clock": clock, "w": h_active, "h": v_active, "h_total": h_active + h_blank,
            "v_total": v_active + v_blank, "tags": tags, "name": name, "extensions": block[126]}


@pytest.mark.parametrize("w,h", [(1024, 768), (640, 480), (1920, 1080), (3840, 2160), (4095, 4095), (16, 16)])
def test_edid_describes_the_mode(w, h):
    got = parse_edid(edid.build_edid(w, h))
    assert (got["w"], got["h"]) == (w, h)
    pixels = got["h_total"] * got["v_total"]
    if w * h <= 3840 * 2160:
        # 60 Hz, to the 10 kHz the pixel clock is given in
        assert 0 <= got["clock"] - 60 * pixels < 10_000
    else:
        assert 1 <= got["clock"] / pixels < 60  # the clock field is 16 bits: a lower rate
    assert got["tags"] == [0xFC, 0xFD, 0x10] and got["name"] == b"xvb gpu" and got["extensions"] == 0


def test_edid_refuses_what_a_detailed_timing_cannot_hold():
    with pytest.raises(ValueError, match="4095x4095"):
        edid.build_edid(4096, 100)


async def test_protocol_features_display_info_and_edid(nursery):
    scene = await Scene(nursery, width=800, height=600).start()
    d = scene.daemon
    await d.send(1)
    assert struct.unpack("=Q", await d.reply(1)) == (1,)  # EDID only
    await d.send(2, struct.pack("=Q", 1))
    await d.send(3)
    info = await d.reply(3)
    assert len(info) == 408
    assert struct.unpack_from("<IIQIB", info) == (0x1101, 0, 0, 0, 0)
    assert struct.unpack_from("<6I", info, 24) == (0, 0, 800, 600, 1, 0)
    assert info[48:] == bytes(15 * 24)
    await d.send(11, struct.pack("=I", 0))
    resp = await d.reply(11)
    assert len(resp) == 1056
    assert struct.unpack_from("<I", resp)[0] == 0x1104
    size = struct.unpack_from("<I", resp, 24)[0]
    assert size == 128 and resp[32 + 128:] == bytes(1024 - 128)
    got = parse_edid(resp[32:32 + 128])
    assert (got["w"], got["h"]) == (800, 600)
    assert scene.errors == []


async def test_get_edid_without_negotiating_edid_closes_the_channel(nursery):
    scene = await Scene(nursery).start()
    await scene.daemon.send(11, struct.pack("=I", 0))
    assert await scene.daemon.closed()
    assert scene.errors == ["display channel: GET_EDID although EDID was not negotiated"]


async def test_setting_a_feature_not_offered_closes_the_channel(nursery):
    scene = await Scene(nursery).start()
    await scene.daemon.send(2, struct.pack("=Q", 2))  # DMABUF2
    assert await scene.daemon.closed()
    assert "sets bits that were not offered" in scene.errors[0]


def xrgb(w, h, seed):
    return bytes((seed + i * 7) & 0xFF if i % 4 != 3 else 0 for i in range(w * h * 4))


async def test_scanout_and_updates_compose_the_frame(nursery):
    scene = await Scene(nursery).start()
    d, sink = scene.daemon, scene.sink
    await d.send(7, struct.pack("=III", 0, 32, 16))
    full = xrgb(32, 16, 1)
    await d.send(8, struct.pack("=5I", 0, 0, 0, 32, 16) + full)
    part = xrgb(5, 3, 99)
    await d.send(8, struct.pack("=5I", 0, 10, 4, 5, 3) + part)
    while sink.flushes < 2:
        await sink.wait_changed()
    expected = bytearray(full)
    for r in range(3):
        start = ((4 + r) * 32 + 10) * 4
        expected[start:start + 20] = part[r * 20:(r + 1) * 20]
    frame = sink.frame(0)
    assert (frame.width, frame.height) == (32, 16)
    rgb = bytearray(32 * 16 * 3)
    rgb[0::3], rgb[1::3], rgb[2::3] = expected[2::4], expected[1::4], expected[0::4]
    assert frame.rgb == bytes(rgb)
    # SCANOUT 0x0 switches it off
    await d.send(7, struct.pack("=III", 0, 0, 0))
    await sink.wait_changed()
    assert sink.scanouts == []
    assert scene.errors == []


async def test_a_full_frame_update_of_several_megabytes(nursery):
    scene = await Scene(nursery).start()
    d, sink = scene.daemon, scene.sink
    await d.send(7, struct.pack("=III", 0, 1024, 768))
    data = os.urandom(1024 * 768 * 4)
    await d.send(8, struct.pack("=5I", 0, 0, 0, 1024, 768) + data)
    while sink.flushes < 1:
        await sink.wait_changed()
    assert sink.frame(0).rgb[:3] == bytes([data[2], data[1], data[0]])
    assert sink.frame(0).pixel(1023, 767) == tuple(data[-2:-5:-1])


@pytest.mark.parametrize("payload,message", [
    (struct.pack("=5I", 0, 0, 0, 4, 4) + bytes(63), "UPDATE of 4x4 pixels carries 63 bytes, not 64"),
    (struct.pack("=5I", 0, 30, 0, 4, 4) + bytes(64), "UPDATE rectangle 4x4+30+0 outside scanout 0 (32x16)"),
    (struct.pack("=5I", 1, 0, 0, 1, 1) + bytes(4), "UPDATE for scanout 1, which is not set up"),
    (struct.pack("=5I", 16, 0, 0, 1, 1) + bytes(4), "UPDATE for scanout 16; there are 16"),
    (b"\0" * 8, "shorter than its 20-byte head"),
])
async def test_malformed_updates_close_the_channel(nursery, payload, message):
    scene = await Scene(nursery).start()
    await scene.daemon.send(7, struct.pack("=III", 0, 32, 16))
    await scene.daemon.send(8, payload)
    assert await scene.daemon.closed()
    assert len(scene.errors) == 1 and message in scene.errors[0]


async def test_unknown_requests_and_wrong_sizes_close_the_channel(nursery):
    scene = await Scene(nursery).start()
    await scene.daemon.send(12, b"x" * 8)
    assert await scene.daemon.closed()
    assert scene.errors == ["display channel: unknown request 12 (size 8)"]
    scene = await Scene(nursery).start()
    await scene.daemon.send(4, b"x" * 8)
    assert await scene.daemon.closed()
    assert scene.errors == ["display channel: CURSOR_POS with a 8-byte payload, expected 12"]


async def test_half_a_message_then_silence_is_an_error_not_a_hang(nursery):
    scene = await Scene(nursery, timeout=0.2).start()
    await scene.daemon.sock.send(HDR.pack(7, 0, 12) + b"\0\0\0\0")
    with trio.fail_after(10):
        assert await scene.daemon.closed()
    assert "4 of 12 payload bytes, then nothing for 0.2 s" in scene.errors[0]


async def test_the_daemon_closing_the_channel_ends_it_quietly(nursery):
    scene = await Scene(nursery).start()
    await scene.daemon.send(1)
    await scene.daemon.reply(1)
    scene.daemon.sock.close()
    with trio.fail_after(10):
        while not scene.server._closed:
            await trio.sleep(0.01)
    assert scene.errors == []


async def test_cursor_messages_reach_the_sink(nursery):
    scene = await Scene(nursery).start()
    d, sink = scene.daemon, scene.sink
    image = bytes(range(256)) * 64
    await d.send(6, struct.pack("=5I", 0, 10, 20, 3, 4) + image)
    await d.send(4, struct.pack("=3I", 0, 50, 60))
    await d.send(5, struct.pack("=3I", 0, 70, 80))
    await d.send(1)
    await d.reply(1)  # everything before it was handled
    c = sink.cursor
    assert (c.scanout, c.x, c.y, c.hot_x, c.hot_y, c.image, c.visible) == (0, 70, 80, 3, 4, image, False)
    await d.send(6, struct.pack("=5I", 0, 1, 1, 64, 0) + image)
    assert await d.closed()
    assert "hot spot (64, 0) outside" in scene.errors[0]


class SlowSink(FrameSink):
    """Holds each presented frame until released."""

    def __init__(self):
        super().__init__()
        self.release = trio.Event()
        self.taken = 0

    async def presented(self, scanout):
        await self.release.wait()
        self.taken += 1
        await super().presented(scanout)


async def test_dmabuf_update_is_answered_only_once_the_frame_is_taken(nursery):
    sink = SlowSink()
    scene = await Scene(nursery, sink=sink).start()
    d = scene.daemon
    fd = os.memfd_create("fake-dmabuf")
    try:
        stride, fd_w, fd_h = 48 * 4, 40, 20
        buf = bytearray(xrgb(48, 20, 5))
        os.write(fd, buf)
        # the scanout is the 16x8 rectangle at (4, 2) of the 40x20 buffer
        await d.send(9, struct.pack("=9Ii", 0, 4, 2, 16, 8, fd_w, fd_h, stride, 0, 0x34325258), fd=fd)
    finally:
        os.close(fd)
    await d.send(10, struct.pack("=5I", 0, 1, 1, 3, 2))
    with trio.move_on_after(0.2):
        await d.sock.recv(1)
        pytest.fail("DMABUF_UPDATE answered before the frame was taken")
    sink.release.set()
    assert await d.reply(10) == b""
    assert sink.taken == 1
    frame = sink.frame(0)
    assert (frame.width, frame.height) == (16, 8)
    for y in range(1, 3):
        for x in range(1, 4):
            i = (2 + y) * stride + (4 + x) * 4
            assert frame.pixel(x, y) == (buf[i + 2], buf[i + 1], buf[i])
    assert frame.pixel(0, 0) == (0, 0, 0)  # not updated yet


@pytest.mark.parametrize("fields,fds,message", [
    ((0, 0, 0, 16, 8, 16, 8, 64, 0, 0x3231564E), 1, "fourcc 0x3231564e"),
    ((0, 4, 0, 16, 8, 16, 8, 64, 0, 0x34325258), 1, "does not fit its 16x8 buffer"),
    ((0, 0, 0, 16, 8, 16, 8, 64, 0, 0x34325258), 0, "came with 0 fds, not 1"),
])
async def test_bad_dmabuf_scanouts_close_the_channel(nursery, fields, fds, message):
    scene = await Scene(nursery).start()
    fd = os.memfd_create("fake-dmabuf")
    os.ftruncate(fd, 64 * 8)
    try:
        await scene.daemon.send(9, struct.pack("=9Ii", *fields), fd=fd if fds else None)
    finally:
        os.close(fd)
    assert await scene.daemon.closed()
    assert message in scene.errors[0]


# -- bridge.gpu_display: one channel per daemon connection ---------------------


class FakeFrontend:
    """What GpuDisplay needs of a VhostUserFrontend: GPU_SET_SOCKET (keeps
    a copy of the daemon's end) and aclose."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.closed = False

    async def set_gpu_socket(self, fd: int) -> None:
        self.sockets.append(socket.socket(fileno=os.dup(fd)))

    async def aclose(self) -> None:
        self.closed = True
        for s in self.sockets:
            s.close()


async def test_one_display_channel_per_connection(nursery):
    from bridge.device_types import DeviceOptions
    from bridge.gpu_display import GpuDisplay

    errors = []
    display = GpuDisplay(DeviceOptions(gpu_resolution=(640, 480)), name="t", label="fake", timeout=5.0,
                         on_error=errors.append)
    first = FakeFrontend()
    await display.attach(first, nursery)
    await display.attach(first, nursery)  # a guest reset and DRIVER_OK again: the same channel
    assert len(first.sockets) == 1
    daemon = Daemon(first.sockets[0])
    await daemon.send(3)
    assert struct.unpack_from("<6I", await daemon.reply(3), 24) == (0, 0, 640, 480, 1, 0)
    second = FakeFrontend()  # the daemon was redialled: a new channel, the old one closed
    await display.attach(second, nursery)
    assert len(second.sockets) == 1
    assert await daemon.closed()
    # A daemon that breaks the protocol is given up: the device hears why
    # and its vhost-user connection is closed.
    await Daemon(second.sockets[0]).send(99)
    with trio.fail_after(10):
        while not second.closed:
            await trio.sleep(0.01)
    assert errors == ["display channel: unknown request 99 (size 0)"]
    display.close()
    daemon.sock.close()
