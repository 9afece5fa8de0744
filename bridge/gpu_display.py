"""The display side of one virtio-gpu device: its frame sink (PNG
snapshots) and the display channel of each daemon connection.

vhost-user-gpu takes one display socket per vhost-user connection
(GPU_SET_SOCKET) and ignores any later one, so the channel is opened at the
first DRIVER_OK of a connection and kept across the guest's resets; a new
connection (the daemon was redialled) gets a new channel. The frame sink
outlives both: what the guest last showed stays visible, as PNGs and in
the live view (bridge.gpu_view).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from bridge.device_types import DeviceOptions
from bridge.frame_sink import FrameSink
from bridge.gpu_view import GpuView
from vhost_user.gpu_display import GpuDisplayServer

log = logging.getLogger(__name__)


class GpuDisplay:
    def __init__(self, options: DeviceOptions, *, name: str, label: str, timeout: float,
                 on_error: Callable[[str], None]) -> None:
        self.options = options
        self.width, self.height = options.gpu_resolution
        self.sink = FrameSink(output_dir=options.gpu_output, png_every_flush=options.gpu_png_every_flush,
                              draw_cursor=options.gpu_cursor, name=name)
        self.label = label
        self.timeout = timeout
        self.on_error = on_error
        self.server: GpuDisplayServer | None = None
        self._frontend: object | None = None
        self.view: GpuView | None = None
        if options.gpu_http is not None:
            self.view = GpuView(self.sink, *options.gpu_http, title=f"{name} ({label})")

    async def start(self, nursery: trio.Nursery) -> None:
        """When the device starts: the live view, if asked for (an address
        in use raises OSError)."""
        if self.view is not None:
            await nursery.start(self.view.run)

    async def attach(self, frontend, nursery: trio.Nursery) -> None:
        """Before ``frontend.start``: open the display channel of this
        connection, unless it has one."""
        if self._frontend is frontend and self.server is not None:
            return
        self.close_channel()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        def broken(reason: str) -> None:
            # The daemon broke the display protocol. vhost-user-gpu takes no
            # second channel, so it can show nothing more (and would wait
            # forever for the next GET_DISPLAY_INFO answer): give it up like
            # a daemon that died. The device reports DEVICE_NEEDS_RESET.
            self.on_error(reason)
            nursery.start_soon(frontend.aclose)

        server = GpuDisplayServer(ours, self.sink, width=self.width, height=self.height, label=self.label,
                                  timeout=self.timeout, on_error=broken)
        try:
            await nursery.start(server.run)
            await frontend.set_gpu_socket(theirs.fileno())
        except BaseException:
            server.close()
            raise
        finally:
            theirs.close()  # the daemon has its own copy now (or never will)
        self.server = server
        self._frontend = frontend
        log.info("%s: display channel open, offering %dx%d", self.label, self.width, self.height)

    async def snapshot(self) -> list[str]:
        """PNGs of every scanout that is on (SIGUSR1), when there is an
        output directory."""
        if self.sink.output_dir is None:
            return []
        return await self.sink.snapshot()

    def close_channel(self) -> None:
        if self.server is not None:
            self.server.close()
        self.server = None
        self._frontend = None

    def close(self) -> None:
        self.close_channel()
