"""The live view of a virtio-gpu scanout: a small HTTP/1.1 server on a
loopback address (``--gpu-http 127.0.0.1:PORT``) for a browser.

    GET /                 a page showing scanout 0, replaced as it changes
    GET /frame.png        the scanout now, as a PNG (404 while it is off);
                          ?scanout=N for another one
    GET /wait?after=V     answers (text: the sink's version) once the
                          picture is newer than version V, or after 25 s

The page's script long-polls /wait and reloads the image, so a frame
reaches the browser as soon as the daemon presents it, without polling
the bridge. The cursor is drawn when the device draws it into its PNGs
(--gpu-cursor). One request per connection (Connection: close); requests
are GET or HEAD only, with a 8 KiB head read within 10 s; at most 32
connections at a time. The server binds loopback only: it has no
authentication, and the frames are the guest's screen.
"""

from __future__ import annotations

import functools
import logging
import urllib.parse

import trio

from bridge import png
from bridge.frame_sink import FrameSink

log = logging.getLogger(__name__)

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
WAIT_LIMIT = 25.0
MAX_CONNECTIONS = 32
PNG_LEVEL = 3

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>html,body{{margin:0;background:#202020;color:#ccc;font:14px sans-serif}}
#f{{display:block;image-rendering:pixelated}}#s{{position:fixed;right:4px;bottom:2px}}</style></head>
<body><img id="f" alt="scanout 0" src="/frame.png?v={version}"><div id="s"></div>
<script>
let v = {version};
const img = document.getElementById("f"), status = document.getElementById("s");
async function follow() {{
  for (;;) {{
    try {{
      const r = await fetch("/wait?after=" + v, {{cache: "no-store"}});
      const next = parseInt(await r.text(), 10);
      if (next !== v) {{
        v = next;
        await new Promise(done => {{ img.onload = img.onerror = done; img.src = "/frame.png?v=" + v; }});
        document.body.dataset.version = v;
      }}
      status.textContent = "";
    }} catch (e) {{
      status.textContent = "bridge unreachable";
      await new Promise(done => setTimeout(done, 1000));
    }}
  }}
}}
document.body.dataset.version = v;
follow();
</script></body></html>
"""


class GpuView:
    def __init__(self, sink: FrameSink, host: str, port: int, *, title: str = "virtio-gpu") -> None:
        self.sink = sink
        self.host = host
        self.port = port
        self.title = title
        self.requests = 0
        self._limit = trio.Semaphore(MAX_CONNECTIONS)
        self._png_cache: tuple[int, int, bytes] | None = None  # (version, scanout, png)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (raises OSError when the address is taken) and serve
        until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("%s: live view on http://%s:%d/", self.title, self.host, self.port)
        task_status.started()
        await trio.serve_listeners(self._serve_one, listeners)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._limit.value == 0:
                await self._send(stream, 503, "text/plain", b"too many connections\n")
                return
            async with self._limit:
                try:
                    await self._handle(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                    pass  # the browser went away

    async def _handle(self, stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(HEAD_TIMEOUT) as scope:
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(MAX_HEAD)
                if not chunk:
                    return
                head += chunk
                if len(head) > MAX_HEAD:
                    await self._send(stream, 431, "text/plain", b"request head too large\n")
                    return
        if scope.cancelled_caught:
            await self._send(stream, 408, "text/plain", b"request head not received in time\n")
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._send(stream, 400, "text/plain", b"bad request line\n")
            return
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            await self._send(stream, 405, "text/plain", b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
            return
        self.requests += 1
        url = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(url.query)
        body_wanted = method == "GET"
        if url.path == "/":
            page = PAGE.format(title=self.title, version=self.sink.version).encode()
            await self._send(stream, 200, "text/html; charset=utf-8", page, body_wanted)
        elif url.path == "/frame.png":
            try:
                scanout = int(query.get("scanout", ["0"])[0])
            except ValueError:
                await self._send(stream, 400, "text/plain", b"scanout is a number\n")
                return
            png = await self._png(scanout)
            if png is None:
                await self._send(stream, 404, "text/plain", f"scanout {scanout} is off\n".encode(), body_wanted)
            else:
                await self._send(stream, 200, "image/png", png, body_wanted)
        elif url.path == "/wait":
            try:
                after = int(query.get("after", ["-1"])[0])
            except ValueError:
                await self._send(stream, 400, "text/plain", b"after is a number\n")
                return
            with trio.move_on_after(WAIT_LIMIT):
                while self.sink.version <= after:
                    await self.sink.wait_changed()
            await self._send(stream, 200, "text/plain", str(self.sink.version).encode(), body_wanted)
        else:
            await self._send(stream, 404, "text/plain", b"not found\n", body_wanted)

    async def _png(self, scanout: int) -> bytes | None:
        version = self.sink.version
        cached = self._png_cache
        if cached is not None and cached[:2] == (version, scanout):
            return cached[2]
        try:
            frame = self.sink.frame(scanout)
        except LookupError:
            return None
        encode = functools.partial(png.encode_rgb, frame.width, frame.height, frame.rgb, level=PNG_LEVEL)
        data = await trio.to_thread.run_sync(encode)
        self._png_cache = (version, scanout, data)
        return data

    @staticmethod
    async def _send(stream: trio.SocketStream, status: int, ctype: str, body: bytes, with_body: bool = True,
                    extra: list[tuple[str, str]] = ()) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  408: "Request Timeout", 431: "Request Header Fields Too Large",
                  503: "Service Unavailable"}[status]
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                   ("Connection", "close"), *extra]
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        await stream.send_all(head.encode("latin-1") + (body if with_body else b""))
