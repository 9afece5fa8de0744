"""The vhost-user-gpu display channel, front-end side (QEMU's
docs/interop/vhost-user-gpu.rst).

At the first DRIVER_OK of a connection the front-end gives the daemon one
end of a socketpair with GPU_SET_SOCKET; the daemon then sends requests on
it and the front-end answers the few that have replies. Header: u32
request, u32 flags (0x4 on replies; ignored on requests: the daemon sends
0), u32 size, then ``size`` payload bytes; fds ride as SCM_RIGHTS.

=====  =====================  ===========================================  ===================
 id    request                payload                                      reply
=====  =====================  ===========================================  ===================
 1     GET_PROTOCOL_FEATURES  -                                            u64
 2     SET_PROTOCOL_FEATURES  u64                                          -
 3     GET_DISPLAY_INFO       -                                            408 bytes
 4     CURSOR_POS             scanout, x, y                                -
 5     CURSOR_POS_HIDE        scanout, x, y                                -
 6     CURSOR_UPDATE          pos, hot_x, hot_y, 64x64 ARGB                -
 7     SCANOUT                scanout, w, h (0, 0: off)                    -
 8     UPDATE                 scanout, x, y, w, h, w*h*4 bytes XRGB        -
 9     DMABUF_SCANOUT         40 bytes + the dmabuf fd (none when off)     -
 10    DMABUF_UPDATE          scanout, x, y, w, h                          empty, once taken
 11    GET_EDID               scanout                                      1056 bytes
=====  =====================  ===========================================  ===================

The daemon blocks its whole main loop on every reply it waits for (the
guest's GET_DISPLAY_INFO waits for ours), so the server answers at once
and never waits for anything but the frame sink.

Pixels are PIXMAN x8r8g8b8 on a little-endian host: bytes B, G, R, X;
the cursor is a8r8g8b8 (B, G, R, A). UPDATE and DMABUF_UPDATE rectangles
are in scanout coordinates, as QEMU's front-end takes them. A dmabuf is
mapped read-only (XRGB8888 or ARGB8888 only) and the rectangle copied out
of it before DMABUF_UPDATE is answered.

Protocol features offered: EDID only (DMABUF2, the SCANOUT2 message with a
modifier, is not implemented). A daemon that sends something malformed,
unknown or not negotiated gets the channel closed and ``on_error`` called
with one sentence why; a daemon that merely closes the channel (it exited)
ends the server quietly: the main connection reports that.
"""

from __future__ import annotations

import array
import enum
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Protocol

import trio

from .edid import build_edid

logger = logging.getLogger(__name__)


class GpuRequest(enum.IntEnum):
    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11


class GpuProtocolFeature(enum.IntFlag):
    EDID = 1 << 0
    DMABUF2 = 1 << 1


SUPPORTED_FEATURES = GpuProtocolFeature.EDID

FLAG_REPLY = 0x4
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size

MAX_SCANOUTS = 16
CURSOR_SIZE = 64
CURSOR_BYTES = CURSOR_SIZE * CURSOR_SIZE * 4
MAX_DIMENSION = 16384
MAX_UPDATE_PIXELS = 8192 * 8192

CURSOR_POS = struct.Struct("=III")
CURSOR_UPDATE_HEAD = struct.Struct("=IIIII")
SCANOUT = struct.Struct("=III")
UPDATE_HEAD = struct.Struct("=IIIII")
DMABUF_SCANOUT = struct.Struct("=IIIIIIIIIi")
U64 = struct.Struct("=Q")
U32 = struct.Struct("=I")

# virtio-gpu response layouts (virtio 1.2 section 5.7.6.7).
CTRL_HDR = struct.Struct("<IIQIB3x")
RESP_OK_DISPLAY_INFO = 0x1101
RESP_OK_EDID = 0x1104
DISPLAY_ONE = struct.Struct("<IIIIII")
DISPLAY_INFO_SIZE = CTRL_HDR.size + MAX_SCANOUTS * DISPLAY_ONE.size  # 408
EDID_BLOB_SIZE = 1024
EDID_REPLY_SIZE = CTRL_HDR.size + 8 + EDID_BLOB_SIZE  # 1056

DRM_FORMAT_XRGB8888 = 0x34325258  # 'XR24'
DRM_FORMAT_ARGB8888 = 0x34325241  # 'AR24'
DMABUF_FORMATS = {DRM_FORMAT_XRGB8888: "XRGB8888", DRM_FORMAT_ARGB8888: "ARGB8888"}

_FIXED_SIZES = {
    GpuRequest.GET_PROTOCOL_FEATURES: 0,
    GpuRequest.SET_PROTOCOL_FEATURES: U64.size,
    GpuRequest.GET_DISPLAY_INFO: 0,
    GpuRequest.CURSOR_POS: CURSOR_POS.size,
    GpuRequest.CURSOR_POS_HIDE: CURSOR_POS.size,
    GpuRequest.CURSOR_UPDATE: CURSOR_UPDATE_HEAD.size + CURSOR_BYTES,
    GpuRequest.SCANOUT: SCANOUT.size,
    GpuRequest.DMABUF_SCANOUT: DMABUF_SCANOUT.size,
    GpuRequest.DMABUF_UPDATE: UPDATE_HEAD.size,
    GpuRequest.GET_EDID: U32.size,
}
_MAX_PAYLOAD = UPDATE_HEAD.size + 4 * MAX_UPDATE_PIXELS

_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(4 * _FD_SIZE)


def display_info(modes: dict[int, tuple[int, int]]) -> bytes:
    """virtio_gpu_resp_display_info: the header (RESP_OK_DISPLAY_INFO) and
    16 pmodes; each scanout in ``modes`` enabled at (0, 0) with its size."""
    out = bytearray(CTRL_HDR.pack(RESP_OK_DISPLAY_INFO, 0, 0, 0, 0))
    for i in range(MAX_SCANOUTS):
        if i in modes:
            w, h = modes[i]
            out += DISPLAY_ONE.pack(0, 0, w, h, 1, 0)
        else:
            out += DISPLAY_ONE.pack(0, 0, 0, 0, 0, 0)
    assert len(out) == DISPLAY_INFO_SIZE
    return bytes(out)


def edid_reply(edid: bytes) -> bytes:
    """virtio_gpu_resp_edid: header (RESP_OK_EDID), le32 size, padding,
    1024 bytes of which the first ``size`` are the EDID."""
    if len(edid) > EDID_BLOB_SIZE:
        raise ValueError(f"an EDID of {len(edid)} bytes does not fit {EDID_BLOB_SIZE}")
    return CTRL_HDR.pack(RESP_OK_EDID, 0, 0, 0, 0) + struct.pack("<II", len(edid), 0) + edid.ljust(
        EDID_BLOB_SIZE, b"\0")


class DisplaySink(Protocol):
    """Where the frames go (bridge.frame_sink.FrameSink)."""

    def set_scanout(self, scanout: int, width: int, height: int) -> None:
        """Scanout ``scanout`` is now ``width`` x ``height`` (0, 0: off)."""

    def update(self, scanout: int, x: int, y: int, width: int, height: int, data: bytes | memoryview) -> None:
        """New XRGB pixels (stride ``width * 4``) for a rectangle of the scanout."""

    async def presented(self, scanout: int) -> None:
        """The daemon flushed the scanout: a frame is complete."""

    def cursor_move(self, scanout: int, x: int, y: int, visible: bool) -> None:
        """The cursor moved (and is shown or hidden)."""

    def cursor_update(self, scanout: int, x: int, y: int, hot_x: int, hot_y: int, image: bytes) -> None:
        """A new 64x64 ARGB cursor image at (x, y), with its hot spot."""


class GpuDisplayError(Exception):
    """The daemon broke the display protocol (one sentence why)."""


class _Dmabuf:
    def __init__(self, fd: int, fields: tuple[int, ...]) -> None:
        (_id, self.x, self.y, self.width, self.height, self.fd_width, self.fd_height, self.stride,
         self.flags, self.fourcc) = fields
        try:
            self.map = mmap.mmap(fd, self.stride * self.fd_height, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def rect(self, x: int, y: int, w: int, h: int) -> bytes:
        """Rows of a rectangle (scanout coordinates), packed at stride w*4."""
        out = bytearray(w * h * 4)
        row = w * 4
        for r in range(h):
            start = (self.y + y + r) * self.stride + (self.x + x) * 4
            out[r * row:(r + 1) * row] = self.map[start:start + row]
        return bytes(out)

    def close(self) -> None:
        self.map.close()


class GpuDisplayServer:
    """Serves one display channel: our end of the GPU_SET_SOCKET socketpair."""

    def __init__(self, sock: socket.socket, sink: DisplaySink, *, width: int = 1024, height: int = 768,
                 label: str = "vhost-user-gpu", timeout: float = 5.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            raise ValueError(f"display size {width}x{height} is not within 1..{MAX_DIMENSION}")
        self._sock = trio.socket.from_stdlib_socket(sock)
        self.sink = sink
        self.width, self.height = width, height
        self.label = f"{label} (display channel)"
        self.timeout = timeout
        self.on_error = on_error
        self.features = GpuProtocolFeature(0)
        self.requests = 0
        self.error: str | None = None
        self._scanouts: dict[int, tuple[int, int]] = {}
        self._dmabufs: dict[int, _Dmabuf] = {}
        self._closed = False
        self._scope: trio.CancelScope | None = None

    # -- life

    def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        self._sock.close()
        for buf in self._dmabufs.values():
            buf.close()
        self._dmabufs.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the daemon closes the channel, breaks the protocol
        (``on_error``), or ``close`` is called. Never raises for the
        daemon's doing."""
        try:
            with trio.CancelScope() as self._scope:
                if self._closed:
                    self._scope.cancel()
                task_status.started()
                try:
                    await self._serve()
                except EOFError as e:
                    if not self._closed:
                        logger.info("%s: closed by the daemon%s", self.label, f" ({e})" if str(e) else "")
        except GpuDisplayError as e:
            self._broken(str(e))
        except Exception as e:  # a bug here must not take the bridge (and its other devices) down
            logger.exception("%s: internal error", self.label)
            self._broken(f"internal error in the display channel: {type(e).__name__}: {e}")
        finally:
            self.close()

    def _broken(self, reason: str) -> None:
        self.error = reason
        logger.error("%s: %s; closing the display channel", self.label, reason)
        if self.on_error is not None and not self._closed:
            self.on_error(f"display channel: {reason}")

    async def _serve(self) -> None:
        while True:
            message = await self._recv()
            if message is None:
                return
            request, payload, fds = message
            try:
                await self._dispatch(request, payload, fds)
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.requests += 1

    # -- framing

    async def _recv(self) -> tuple[int, memoryview, list[int]] | None:
        fds: list[int] = []
        ok = False
        try:
            head = bytearray()
            deadline_scope = None
            while len(head) < HEADER_SIZE:
                data = await self._recvmsg(HEADER_SIZE - len(head), fds, deadline_scope)
                if not data:
                    if head:
                        raise GpuDisplayError(f"the daemon closed the channel after {len(head)} bytes of a header")
                    raise EOFError()
                head += data
                if deadline_scope is None:
                    deadline_scope = trio.current_time() + self.timeout
            request, _flags, size = HEADER.unpack(head)
            try:
                name = GpuRequest(request).name
            except ValueError:
                raise GpuDisplayError(f"unknown request {request} (size {size})") from None
            expected = _FIXED_SIZES.get(GpuRequest(request))
            if expected is not None and size != expected:
                raise GpuDisplayError(f"{name} with a {size}-byte payload, expected {expected}")
            if size > _MAX_PAYLOAD:
                raise GpuDisplayError(f"{name} with a {size}-byte payload, more than {_MAX_PAYLOAD}")
            payload = bytearray(size)
            view = memoryview(payload)
            got = 0
            while got < size:
                with trio.move_on_at(deadline_scope) as cs:
                    n = await self._sock.recv_into(view[got:], size - got)
                if cs.cancelled_caught:
                    raise GpuDisplayError(f"{name}: {got} of {size} payload bytes, then nothing for "
                                          f"{self.timeout:g} s")
                if n == 0:
                    raise GpuDisplayError(f"the daemon closed the channel in the middle of {name} "
                                          f"({got} of {size} bytes)")
                got += n
            ok = True
            return request, view, fds
        except (trio.ClosedResourceError, OSError) as e:
            if self._closed:
                return None
            raise EOFError(getattr(e, "strerror", None) or str(e)) from None
        finally:
            if not ok:
                for fd in fds:
                    os.close(fd)

    async def _recvmsg(self, count: int, fds: list[int], deadline: float | None) -> bytes:
        with trio.move_on_at(deadline if deadline is not None else float("inf")) as cs:
            data, ancillary, flags, _ = await self._sock.recvmsg(count, _ANCILLARY,
                                                                 getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        if cs.cancelled_caught:
            raise GpuDisplayError(f"half a header, then nothing for {self.timeout:g} s")
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(raw[:len(raw) - len(raw) % _FD_SIZE])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise GpuDisplayError("more fds than any request carries")
        return data

    async def _reply(self, request: GpuRequest, payload: bytes = b"") -> None:
        data = HEADER.pack(request, FLAG_REPLY, len(payload)) + payload
        try:
            with trio.fail_after(self.timeout):
                await self._send_all(data)
        except trio.TooSlowError:
            raise GpuDisplayError(f"the daemon did not take the reply to {request.name} within "
                                  f"{self.timeout:g} s") from None
        except (OSError, trio.ClosedResourceError) as e:
            raise EOFError(str(e)) from None

    async def _send_all(self, data: bytes) -> None:
        sent = 0
        while sent < len(data):
            sent += await self._sock.send(data[sent:], getattr(socket, "MSG_NOSIGNAL", 0))

    # -- requests

    def _scanout_id(self, name: str, scanout: int) -> None:
        if scanout >= MAX_SCANOUTS:
            raise GpuDisplayError(f"{name} for scanout {scanout}; there are {MAX_SCANOUTS}")

    def _check_rect(self, name: str, scanout: int, x: int, y: int, w: int, h: int) -> None:
        size = self._scanouts.get(scanout)
        if size is None:
            raise GpuDisplayError(f"{name} for scanout {scanout}, which is not set up")
        if x + w > size[0] or y + h > size[1]:
            raise GpuDisplayError(f"{name} rectangle {w}x{h}+{x}+{y} outside scanout {scanout} "
                                  f"({size[0]}x{size[1]})")

    async def _dispatch(self, request: int, payload: memoryview, fds: list[int]) -> None:
        req = GpuRequest(request)
        name = req.name
        if fds and req is not GpuRequest.DMABUF_SCANOUT:
            raise GpuDisplayError(f"{name} came with {len(fds)} fds")
        logger.debug("%s <- %s size=%d", self.label, name, len(payload))
        if req is GpuRequest.GET_PROTOCOL_FEATURES:
            await self._reply(req, U64.pack(int(SUPPORTED_FEATURES)))
        elif req is GpuRequest.SET_PROTOCOL_FEATURES:
            (value,) = U64.unpack(payload)
            if value & ~int(SUPPORTED_FEATURES):
                raise GpuDisplayError(f"SET_PROTOCOL_FEATURES {value:#x} sets bits that were not offered "
                                      f"({int(SUPPORTED_FEATURES):#x})")
            self.features = GpuProtocolFeature(value)
            logger.info("%s: protocol features %#x", self.label, value)
        elif req is GpuRequest.GET_DISPLAY_INFO:
            await self._reply(req, display_info({0: (self.width, self.height)}))
        elif req is GpuRequest.GET_EDID:
            if not self.features & GpuProtocolFeature.EDID:
                raise GpuDisplayError("GET_EDID although EDID was not negotiated")
            (scanout,) = U32.unpack(payload)
            self._scanout_id(name, scanout)
            await self._reply(req, edid_reply(build_edid(self.width, self.height, serial=scanout + 1)))
        elif req in (GpuRequest.CURSOR_POS, GpuRequest.CURSOR_POS_HIDE):
            scanout, x, y = CURSOR_POS.unpack(payload)
            self._scanout_id(name, scanout)
            self.sink.cursor_move(scanout, x, y, req is GpuRequest.CURSOR_POS)
        elif req is GpuRequest.CURSOR_UPDATE:
            scanout, x, y, hot_x, hot_y = CURSOR_UPDATE_HEAD.unpack_from(payload)
            self._scanout_id(name, scanout)
            if hot_x >= CURSOR_SIZE or hot_y >= CURSOR_SIZE:
                raise GpuDisplayError(f"CURSOR_UPDATE hot spot ({hot_x}, {hot_y}) outside the 64x64 cursor")
            self.sink.cursor_update(scanout, x, y, hot_x, hot_y, bytes(payload[CURSOR_UPDATE_HEAD.size:]))
        elif req is GpuRequest.SCANOUT:
            scanout, w, h = SCANOUT.unpack(payload)
            self._set_scanout(name, scanout, w, h)
        elif req is GpuRequest.UPDATE:
            if len(payload) < UPDATE_HEAD.size:
                raise GpuDisplayError(f"UPDATE with a {len(payload)}-byte payload, shorter than its "
                                      f"{UPDATE_HEAD.size}-byte head")
            scanout, x, y, w, h = UPDATE_HEAD.unpack_from(payload)
            self._scanout_id(name, scanout)
            if UPDATE_HEAD.size + w * h * 4 != len(payload):
                raise GpuDisplayError(f"UPDATE of {w}x{h} pixels carries {len(payload) - UPDATE_HEAD.size} "
                                      f"bytes, not {w * h * 4}")
            self._check_rect(name, scanout, x, y, w, h)
            if w and h:
                self.sink.update(scanout, x, y, w, h, payload[UPDATE_HEAD.size:])
            await self.sink.presented(scanout)
        elif req is GpuRequest.DMABUF_SCANOUT:
            await self._dmabuf_scanout(payload, fds)
        elif req is GpuRequest.DMABUF_UPDATE:
            scanout, x, y, w, h = UPDATE_HEAD.unpack(payload)
            self._scanout_id(name, scanout)
            buf = self._dmabufs.get(scanout)
            if buf is None:
                raise GpuDisplayError(f"DMABUF_UPDATE for scanout {scanout}, which has no dmabuf")
            self._check_rect(name, scanout, x, y, w, h)
            if w and h:
                self.sink.update(scanout, x, y, w, h, buf.rect(x, y, w, h))
            await self.sink.presented(scanout)
            # Only now: the daemon may draw into the buffer again.
            await self._reply(req)

    def _set_scanout(self, name: str, scanout: int, w: int, h: int) -> None:
        self._scanout_id(name, scanout)
        if (w == 0) != (h == 0) or w > MAX_DIMENSION or h > MAX_DIMENSION:
            raise GpuDisplayError(f"{name} {scanout} of {w}x{h}")
        if w:
            self._scanouts[scanout] = (w, h)
        else:
            self._scanouts.pop(scanout, None)
        old = self._dmabufs.pop(scanout, None)
        if old is not None:
            old.close()
        self.sink.set_scanout(scanout, w, h)

    async def _dmabuf_scanout(self, payload: memoryview, fds: list[int]) -> None:
        fields = DMABUF_SCANOUT.unpack(payload)
        scanout, x, y, w, h, fd_w, fd_h, stride, _flags, fourcc = fields
        name = "DMABUF_SCANOUT"
        if w == 0 and h == 0:
            if fds:
                raise GpuDisplayError(f"{name} switching scanout {scanout} off came with an fd")
            self._set_scanout(name, scanout, 0, 0)
            return
        if len(fds) != 1:
            raise GpuDisplayError(f"{name} for scanout {scanout} came with {len(fds)} fds, not 1")
        if fourcc & 0xFFFFFFFF not in DMABUF_FORMATS:
            raise GpuDisplayError(f"{name} with fourcc {fourcc & 0xFFFFFFFF:#x}; only XRGB8888 and "
                                  f"ARGB8888 are shown")
        if x + w > fd_w or y + h > fd_h or stride < fd_w * 4:
            raise GpuDisplayError(f"{name} {w}x{h}+{x}+{y} does not fit its {fd_w}x{fd_h} buffer of "
                                  f"stride {stride}")
        self._set_scanout(name, scanout, w, h)
        fd = fds.pop()
        try:
            self._dmabufs[scanout] = _Dmabuf(fd, fields)
        except (OSError, ValueError) as e:
            raise GpuDisplayError(f"{name}: cannot map the dmabuf of scanout {scanout}: {e}") from None
