"""The live view's HTTP server (bridge.gpu_view) on a frame sink, spoken to
with plain sockets; the browser itself is in tests/test_e2e_gpu.py."""

from __future__ import annotations

import pytest
import trio

from bridge.frame_sink import FrameSink
from bridge.gpu_view import GpuView
from bridge import png


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest.fixture
async def view(nursery):
    sink = FrameSink()
    server = GpuView(sink, "127.0.0.1", 0)
    await nursery.start(server.run)
    return server


async def test_the_frame_as_png_and_404_while_off(view):
    status, headers, body = await http(view.port, get("/frame.png"))
    assert status == 404 and body == b"scanout 0 is off\n"
    view.sink.set_scanout(0, 4, 3)
    view.sink.update(0, 0, 0, 4, 3, bytes([1, 2, 3, 0]) * 12)
    await view.sink.presented(0)
    status, headers, body = await http(view.port, get("/frame.png"))
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["Cache-Control"] == "no-store"
    assert int(headers["Content-Length"]) == len(body)
    assert png.decode_rgb(body) == (4, 3, bytes([3, 2, 1]) * 12)
    status, headers, body = await http(view.port, get("/frame.png", "HEAD"))
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, _, _ = await http(view.port, get("/frame.png?scanout=1"))
    assert status == 404


async def test_the_page_follows_the_sink_version(view):
    status, headers, body = await http(view.port, get("/"))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/frame.png?v=0"' in body and b"/wait?after=" in body


async def test_wait_answers_when_the_picture_changes(view, nursery):
    sink = view.sink
    sink.set_scanout(0, 2, 2)
    version = sink.version
    answers = []

    async def waiter():
        answers.append(await http(view.port, get(f"/wait?after={version}")))

    nursery.start_soon(waiter)
    await trio.sleep(0.1)
    assert answers == []  # still waiting
    sink.update(0, 0, 0, 1, 1, bytes(4))
    await sink.presented(0)
    with trio.fail_after(10):
        while not answers:
            await trio.sleep(0.01)
    status, _, body = answers[0]
    assert status == 200 and int(body) == sink.version > version
    # an old version answers at once
    status, _, body = await http(view.port, get("/wait?after=0"))
    assert int(body) == sink.version


@pytest.mark.parametrize("request_bytes,status", [
    (get("/", "POST"), 405),
    (b"NONSENSE\r\n\r\n", 400),
    (get("/nothing"), 404),
    (get("/frame.png?scanout=x"), 400),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n", 431),
])
async def test_bad_requests_get_one_clear_answer(view, request_bytes, status):
    got, _, _ = await http(view.port, request_bytes)
    assert got == status


async def test_an_address_in_use_is_an_error(view, nursery):
    other = GpuView(view.sink, "127.0.0.1", view.port)
    with pytest.raises(OSError):
        await nursery.start(other.run)
